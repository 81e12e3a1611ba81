"""OpenAI's transcription API (/v1/audio/transcriptions, /v1/models) and any audio file in.

In-process: the response formats, the form's validation (OpenAI-shaped 400s naming the
parameter), decoding of mp3/m4a/ogg/flac/webm/wav at any rate with PyAV. End to end, against
one shared daemon with a whisper worker and a token: the official ``openai`` client, unchanged,
for every response_format, stream=True, prompt and temperature, errors; an mp3 and a 44.1 kHz
stereo file, whose text equals /audio/transcribe's for the same audio after conversion; and
``curl -F`` as in OpenAI's docs. The compressed files are made here from the WAV fixtures.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import falcon
import falcon.testing
import numpy as np
import pytest

from shmmel.app import error_serializer
from shmmel.config import Config
from shmmel.whisper import formats

from .conftest import start_daemon, stop_daemon, wait_for
from .test_audio_http import assert_clean
from .test_whisper import MISSING, SENTENCES, load, two_windows, wer

av = pytest.importorskip("av", reason="the [audio] extra (PyAV) is not installed: "
                                      "pip install 'shmmel[audio]'")
from shmmel.decode import AudioTooLong, Undecodable, decode_audio  # noqa: E402
from shmmel.decode import encode_audio as encode  # noqa: E402
from shmmel.whisper import openai as oa  # noqa: E402

TOKEN = "openai-test-token-42"
SR = 16000


FILES = {  # name: (container, codec, rate, channels)
    "speech.mp3": ("mp3", "libmp3lame", 44100, 2),
    "speech.m4a": ("ipod", "aac", 44100, 2),
    "speech.ogg": ("ogg", "libopus", 48000, 1),
    "speech.webm": ("webm", "libopus", 48000, 2),
    "speech.flac": ("flac", "flac", 22050, 1),
    "speech.wav": ("wav", "pcm_s16le", 44100, 2),
    "speech8k.wav": ("wav", "pcm_s16le", 8000, 1),
}


def speech() -> np.ndarray:
    """Two sentences with a gap (about 9 s)."""
    return np.concatenate([load("speech1"), np.zeros(SR // 2, np.int16), load("speech2")])


# -- the formats ---------------------------------------------------------------------------
SEGS = [{"start": 0.0, "end": 2.5, "text": " Hello there.", "tokens": [1]},
        {"start": 3661.25, "end": 3662.0, "text": " Bye.", "tokens": [2]}]


def test_srt_and_vtt():
    assert formats.srt(SEGS) == ("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
                                 "2\n01:01:01,250 --> 01:01:02,000\nBye.\n\n")
    assert formats.vtt(SEGS) == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
                                 "01:01:01.250 --> 01:01:02.000\nBye.\n\n")


def test_deltas_concatenate_to_the_final_text():
    d = formats.Deltas()
    texts = [" Hello ", "", "  world.", " And more. "]
    got = "".join(d.add(t) for t in texts)
    assert got == "".join(texts).strip() == d.sent
    done = json.loads(d.done_event()[len(b"data: "):])
    assert done == {"type": "transcript.text.done", "text": got}


def test_verbose_json_has_openai_segments():
    windows = [{"window": 1, "text": "Hello there. Bye.", "segments": SEGS}]
    scores = [{"avg_logprob": -0.25, "no_speech_prob": 0.01, "temperature": 0.0}]
    result = {"text": "Hello there. Bye.", "segments": SEGS, "duration": 3662.0}
    ctype, body = formats.render("verbose_json", result, windows, scores)
    v = json.loads(body)
    assert ctype == "application/json" and v["language"] == "english"
    assert v["usage"] == {"type": "duration", "seconds": 3662}
    assert [s["id"] for s in v["segments"]] == [0, 1]
    assert v["segments"][1]["seek"] == 3000 and v["segments"][0]["avg_logprob"] == -0.25
    assert v["segments"][0]["compression_ratio"] > 0
    assert formats.render("text", result, windows, scores)[1] == b"Hello there. Bye.\n"


# -- the form, in-process -----------------------------------------------------------------------
def multipart(fields: dict[str, str | list[str]], file: bytes | None = b"RIFF",
              filename: str = "a.wav") -> tuple[bytes, str]:
    from urllib3 import encode_multipart_formdata

    items: list[tuple[str, object]] = [(k, x) for k, v in fields.items()
                                       for x in (v if isinstance(v, list) else [v])]
    if file is not None:
        items.insert(0, ("file", (filename, file, "application/octet-stream")))
    return encode_multipart_formdata(items)


@pytest.fixture
def client():
    app = falcon.App()
    app.set_error_serializer(oa.openai_errors(error_serializer))
    oa.add_routes(app, Config(max_body_bytes=1 << 20), None, None)
    return falcon.testing.TestClient(app)


BAD_FORMS = [  # fields, file, status, param, code, words
    ({"model": "whisper-1"}, None, 400, "file", "missing_file", "'file'"),
    ({}, b"x", 400, "model", "missing_model", "model"),
    ({"model": "gpt-4o-transcribe"}, b"x", 400, "model", "model_not_found", "tiny.en"),
    ({"model": "whisper-1", "language": "fr"}, b"x", 400, "language", "unsupported_language",
     "English-only"),
    ({"model": "whisper-1", "response_format": "diarized_json"}, b"x", 400, "response_format",
     "invalid_value", "srt"),
    ({"model": "whisper-1", "temperature": "1.5"}, b"x", 400, "temperature", "invalid_value",
     "between 0 and 1"),
    ({"model": "whisper-1", "temperature": "nan"}, b"x", 400, "temperature", "invalid_value",
     "between"),
    ({"model": "whisper-1", "temperature": "hot"}, b"x", 400, "temperature", "invalid_value",
     "number"),
    ({"model": "whisper-1", "timestamp_granularities[]": ["segment", "word"]}, b"x", 400,
     "timestamp_granularities", "unsupported_value", "'word' is not supported"),
    ({"model": "whisper-1", "stream": "maybe"}, b"x", 400, "stream", "invalid_value", "true"),
    ({"model": "whisper-1", "stream": "true", "response_format": "srt"}, b"x", 400, "stream",
     "invalid_value", "json or text"),
    ({"model": "whisper-1", "chunking_strategy": "auto"}, b"x", 400, "chunking_strategy",
     "unknown_parameter", "unsupported parameter"),
    ({"model": "whisper-1"}, b"", 400, "file", "invalid_audio", "empty"),
    ({"model": "whisper-1"}, b"this is not audio at all" * 40, 400, "file", "invalid_audio",
     "not audio that FFmpeg can read"),
    ({"model": "whisper-1"}, bytes(2 << 20), 413, "file", "file_too_large", "limit"),
]


@pytest.mark.parametrize("fields, file, status, param, code, words", BAD_FORMS,
                         ids=[f"{b[3]}-{b[4]}" for b in BAD_FORMS])
def test_bad_forms_get_openai_shaped_errors(client, fields, file, status, param, code, words):
    body, ctype = multipart(fields, file)
    r = client.simulate_post("/v1/audio/transcriptions", body=body,
                             headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    err = r.json["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert words in err["message"]


def test_not_multipart_and_unknown_paths(client):
    r = client.simulate_post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert r.status_code == 415 and "multipart/form-data" in r.json["error"]["message"]
    r = client.simulate_get("/v1/nothing")
    assert r.status_code == 404 and r.json["error"]["type"] == "invalid_request_error"
    r = client.simulate_get("/v1/models/whisper-2")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert [m["id"] for m in client.simulate_get("/v1/models").json["data"]] == list(oa.MODELS)


def test_without_whisper_workers_it_is_501_and_no_model_is_listed():
    app = falcon.App()
    app.set_error_serializer(oa.openai_errors(error_serializer))
    oa.add_routes(app, Config(whisper_workers=0), None, None)
    c = falcon.testing.TestClient(app)
    body, ctype = multipart({"model": "whisper-1"})
    r = c.simulate_post("/v1/audio/transcriptions", body=body, headers={"Content-Type": ctype})
    assert r.status_code == 501 and "whisper_workers" in r.json["error"]["message"]
    body, ctype = multipart({"model": "whisper-2"})  # the form is checked first
    r = c.simulate_post("/v1/audio/transcriptions", body=body, headers={"Content-Type": ctype})
    assert r.status_code == 400 and r.json["error"]["param"] == "model"
    assert c.simulate_get("/v1/models").json["data"] == []


# -- decoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FILES))
def test_every_format_decodes_to_16k_mono(name):
    pcm = load("speech1")
    container, codec, rate, channels = FILES[name]
    out = decode_audio(encode(pcm, rate, container, codec, channels))
    assert out.dtype == np.int16 and out.ndim == 1
    assert abs(out.size - pcm.size) < 0.05 * SR  # codec padding at most tens of ms
    n = min(out.size, pcm.size)
    # the same signal at the same level (stereo averaged): lossy codecs and resampling keep
    # the energy within a few percent
    rms = lambda x: np.sqrt(np.mean(x[:n].astype(np.float64) ** 2))  # noqa: E731
    assert rms(out) == pytest.approx(rms(pcm), rel=0.1)


def test_16k_mono_wav_decodes_exactly():
    pcm = load("speech3")
    out = decode_audio(encode(pcm, SR, "wav", "pcm_s16le"))
    assert np.array_equal(out, pcm)


def test_undecodable_and_too_long():
    with pytest.raises(Undecodable, match="not audio that FFmpeg can read"):
        decode_audio(b"\x00\x01garbage" * 100)
    mp3 = encode(speech(), 44100, "mp3", "libmp3lame")
    with pytest.raises(Undecodable, match="mp3"):  # the header survives, the frames do not
        decode_audio(mp3[:2000] + bytes(range(256)) * 40)
    with pytest.raises(AudioTooLong, match="limit of 2 s"):
        decode_audio(mp3, max_seconds=2)


# -- end to end with the official client ----------------------------------------------------------
@pytest.fixture(scope="module")
def odaemon(tmp_path_factory):
    if MISSING is not None:
        pytest.skip(f"the [whisper] extra is not installed ({MISSING} missing)")
    d = start_daemon(tmp_path_factory.mktemp("openai"), "--workers", "1", "--http-workers",
                     "2", "--worker-kind", "cpu",
                     extra_env={"SHMMEL_WHISPER_WORKERS": "1", "SHMMEL_AUTH_TOKEN": TOKEN,
                                "SHMMEL_MAX_BODY_BYTES": str(8 << 20),
                                # the min_body_rate check (httpworker) shuts down a request
                                # still working 5 s after its body arrived whole before it
                                # began (reported to the lead); these tests are not about
                                # slow clients
                                "SHMMEL_MIN_BODY_RATE": "0"})
    try:
        wait_for(lambda: all(w["state"] == "ready" for w in d.status()["workers"]),
                 timeout=60, what="the whisper worker ready")
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def oclient(odaemon):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{odaemon.port}/v1", api_key=TOKEN,
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def mp3() -> bytes:
    return encode(speech(), 44100, "mp3", "libmp3lame", 1)


def reference_text(d, audio: bytes) -> str:
    """/audio/transcribe's text for the same audio after conversion to 16 kHz mono."""
    pcm = decode_audio(audio)
    status, _, raw = d.request("POST", "/audio/transcribe", pcm.astype("<i2").tobytes(),
                               {"Content-Type": "audio/L16;rate=16000",
                                "Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert status == 200, raw
    return json.loads(raw)["text"]


@pytest.mark.e2e
def test_models_are_listed(oclient):
    assert [m.id for m in oclient.models.list()] == ["whisper-1", "tiny.en"]
    assert oclient.models.retrieve("tiny.en").id == "tiny.en"


@pytest.mark.e2e
def test_every_response_format_with_an_mp3(odaemon, oclient, mp3, record_property):
    ref = reference_text(odaemon, mp3)
    sentences = f"{SENTENCES['speech1']} {SENTENCES['speech2']}"
    record_property("wer", wer(sentences, ref))
    assert wer(sentences, ref) < 0.5, ref  # recognisably the sentences (tiny.en, synthetic voice)
    create = oclient.audio.transcriptions.create
    got = create(model="whisper-1", file=("speech.mp3", mp3))
    assert got.text == ref
    assert create(model="tiny.en", file=("speech.mp3", mp3), response_format="text",
                  language="en").strip() == ref
    v = create(model="whisper-1", file=("speech.mp3", mp3), response_format="verbose_json",
               timestamp_granularities=["segment"])
    assert v.text == ref and v.language == "english"
    assert v.duration == pytest.approx(speech().size / SR, abs=0.05)
    assert "".join(s.text for s in v.segments).strip() == ref
    assert all(0 <= s.start <= s.end <= v.duration + 1e-6 for s in v.segments)
    assert all(s.avg_logprob < 0 and 0 <= s.no_speech_prob <= 1 for s in v.segments)
    srt = create(model="whisper-1", file=("speech.mp3", mp3), response_format="srt")
    vtt = create(model="whisper-1", file=("speech.mp3", mp3), response_format="vtt")
    assert srt.startswith("1\n00:00:0") and " --> " in srt
    assert vtt.startswith("WEBVTT\n\n00:00:0")
    for s in v.segments:
        assert f"{formats.timestamp(s.start, ',')} --> {formats.timestamp(s.end, ',')}" in srt
        assert s.text.strip() in vtt
    assert_clean(odaemon)


@pytest.mark.e2e
def test_a_44k_stereo_file_of_two_windows_streams_one_delta_per_window(odaemon, oclient):
    pcm, _ = two_windows()
    m4a = encode(pcm, 44100, "ipod", "aac", 2)
    ref = reference_text(odaemon, m4a)
    events = list(oclient.audio.transcriptions.create(model="whisper-1",
                                                      file=("speech.m4a", m4a), stream=True))
    types = [e.type for e in events]
    assert types == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) - 1 == 2  # a delta per 30 s window
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == ref
    assert oclient.audio.transcriptions.create(model="whisper-1",
                                               file=("speech.m4a", m4a)).text == ref
    assert_clean(odaemon)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["speech.ogg", "speech.webm", "speech.flac", "speech8k.wav"])
def test_other_formats_transcribe(odaemon, oclient, name):
    container, codec, rate, channels = FILES[name]
    data = encode(load("speech3"), rate, container, codec, channels)
    got = oclient.audio.transcriptions.create(model="whisper-1", file=(name, data))
    assert got.text == reference_text(odaemon, data)
    assert wer(SENTENCES["speech3"], got.text) < 0.7, got.text  # speech, not noise


@pytest.mark.e2e
def test_prompt_and_temperature_reach_the_decoder(oclient):
    wav = encode(load("speech2"), SR, "wav", "pcm_s16le")
    create = oclient.audio.transcriptions.create
    plain = create(model="whisper-1", file=("a.wav", wav), response_format="verbose_json")
    prompted = create(model="whisper-1", file=("a.wav", wav), response_format="verbose_json",
                      prompt="Stella, groceries, the store.")
    # the context changes the model's confidence, whatever the text
    assert prompted.segments[0].avg_logprob != plain.segments[0].avg_logprob
    assert plain.segments[0].temperature == 0.0
    hot = create(model="whisper-1", file=("a.wav", wav), response_format="verbose_json",
                 temperature=0.7)
    assert hot.segments and all(s.temperature == 0.7 for s in hot.segments)
    again = create(model="whisper-1", file=("a.wav", wav), response_format="verbose_json")
    assert again.text == plain.text  # greedy is deterministic
    # a long prompt: its last 223 tokens are the context, and share the decoder's 448
    # positions with the output (a repetitive one makes tiny.en repeat it: not asserted)
    long = create(model="whisper-1", file=("a.wav", wav), response_format="verbose_json",
                  prompt="Stella went shopping. " * 400)
    assert long.text and long.segments[0].avg_logprob != plain.segments[0].avg_logprob


@pytest.mark.e2e
def test_errors_through_the_client(odaemon, oclient, mp3):
    openai = pytest.importorskip("openai")
    create = oclient.audio.transcriptions.create
    cases = [(dict(language="de"), "language"), (dict(timestamp_granularities=["word"]),
                                                 "timestamp_granularities"),
             (dict(model="gpt-4o-transcribe"), "model")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            create(**{"model": "whisper-1", "file": ("speech.mp3", mp3), **extra})
        assert e.value.status_code == 400 and e.value.param == param, e.value
    with pytest.raises(openai.BadRequestError, match="FFmpeg"):
        create(model="whisper-1", file=("notes.txt", b"not audio, just some text" * 20))
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{odaemon.port}/v1", api_key="wrong",
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", mp3))
    assert e.value.code == "invalid_api_key"
    assert_clean(odaemon)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_as_in_openais_docs(odaemon, tmp_path, mp3):
    path = tmp_path / "speech.mp3"
    path.write_bytes(mp3)
    url = f"http://127.0.0.1:{odaemon.port}/v1/audio/transcriptions"
    out = subprocess.run(["curl", "-sS", "--fail-with-body", url,
                          "-H", f"Authorization: Bearer {TOKEN}",
                          "-H", "Content-Type: multipart/form-data",
                          "-F", f"file=@{path}", "-F", "model=whisper-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert json.loads(out.stdout)["text"] == reference_text(odaemon, mp3)
    out = subprocess.run(["curl", "-sS", url, "-H", f"Authorization: Bearer {TOKEN}",
                          "-F", f"file=@{path}", "-F", "model=whisper-1",
                          "-F", "response_format=srt"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("1\n00:00:00")


@pytest.mark.e2e
def test_the_transcribe_bench_drives_the_openai_route(odaemon):
    from shmmel.loadgen.transcribeload import TranscribeLoad, run_transcribe

    url = f"http://127.0.0.1:{odaemon.port}"
    r = run_transcribe(url, TranscribeLoad(streams=1, duration=2, warmup=0, signal="noise",
                                           openai=True), token=TOKEN)
    assert r["windows"] >= 1 and r["error_count"] == 0, r["errors"]
    assert r["load"]["openai"] is True and r["mp3_bytes"] > 1000
    assert 0 < r["decode_ms"]["min"] <= r["decode_ms"]["median"] < r["latency_ms"]["max"]
    assert r["batch"]["mean"] is None  # OpenAI's answer does not say


def test_only_a_16k_mono_wav_is_sent_as_it_is(tmp_path):
    from shmmel.decode import is_service_wav

    cases = {"a.wav": encode(load("speech1"), SR, "wav", "pcm_s16le"),
             "b.wav": encode(load("speech1"), 44100, "wav", "pcm_s16le"),
             "c.wav": encode(load("speech1"), SR, "wav", "pcm_s16le", 2),
             "d.mp3": encode(load("speech1"), SR, "mp3", "libmp3lame")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert [is_service_wav(tmp_path / n) for n in sorted(cases)] == [True, False, False, False]


@pytest.mark.e2e
def test_shmmel_mel_takes_an_mp3(odaemon, tmp_path, mp3):
    from shmmel.client import MelClient

    from .conftest import run_cli

    path, out = tmp_path / "speech.mp3", tmp_path / "mel.npy"
    path.write_bytes(mp3)
    url = f"http://127.0.0.1:{odaemon.port}"
    run_cli("mel", str(path), "-o", str(out), "--url", url, "--token", TOKEN, env=odaemon.env)
    got = np.load(out)
    # the mel of the audio after conversion, as the service computes it for 16 kHz PCM
    want = MelClient(url, token=TOKEN).mel(decode_audio(mp3))
    assert got.shape == want.shape == (80, speech().size // 160)
    assert np.array_equal(got, want)


@pytest.mark.e2e
def test_too_long_and_broken_files(odaemon, oclient, mp3):
    openai = pytest.importorskip("openai")
    limit = (8 << 20) / (2 * SR)  # the daemon's max_body_bytes as 16 kHz 16-bit PCM: 262 s
    long_mp3 = encode(np.zeros(int((limit + 20) * SR), np.int16), SR, "mp3", "libmp3lame")
    assert len(long_mp3) < 8 << 20
    with pytest.raises(openai.APIStatusError) as e:
        oclient.audio.transcriptions.create(model="whisper-1", file=("long.mp3", long_mp3))
    assert e.value.status_code == 413 and e.value.code == "audio_too_long"
    assert "the limit is 262 s" in e.value.message
    broken = mp3[:20000] + bytes(range(256)) * 200  # decodes for a while, then cannot
    with pytest.raises(openai.BadRequestError, match="decoding the mp3"):
        oclient.audio.transcriptions.create(model="whisper-1", file=("b.mp3", broken))
    with pytest.raises(openai.APIError, match="decoding the mp3"):  # in-band, as an event
        list(oclient.audio.transcriptions.create(model="whisper-1", file=("b.mp3", broken),
                                                 stream=True))
    assert_clean(odaemon)
