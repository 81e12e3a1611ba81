"""The OpenAPI description, and schemathesis fuzzing the app (in-process: tests/inproc.py,
NumPy workers as threads over real shared memory) against it.

Every generated request must get a declared status with a declared content type, never a
5xx (a 503 only with Retry-After), and every error must be JSON {"error", "detail"}; the
instance must be ready with no stream or slot left behind afterwards.

``SHMMEL_FUZZ_EXAMPLES`` (default 25) sets the examples per operation in the fuzzing phase.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from shmmel.openapi import SPEC, SPEC_JSON, OpenAPIResource  # noqa: E402
from shmmel.whisper import whisper_missing  # noqa: E402

from .conftest import wait_for  # noqa: E402
from .inproc import InProc  # noqa: E402

EXAMPLES = int(os.environ.get("SHMMEL_FUZZ_EXAMPLES", "25"))
TOKEN = "fuzz-token-0123456789"  # only enforced once the service knows auth_token


# -- the document itself (no daemon) -------------------------------------------------------

def test_spec_is_valid_openapi_and_lists_every_endpoint():
    schema = schemathesis.openapi.from_dict(SPEC)
    labels = {r.ok().label for r in schema.get_all_operations()}
    assert labels == {
        "POST /process", "GET /healthz", "GET /readyz", "POST /audio/stream",
        "POST /audio/streams", "POST /audio/streams/{stream_id}",
        "GET /audio/streams/{stream_id}", "DELETE /audio/streams/{stream_id}",
        "POST /audio/transcribe", "GET /metrics", "GET /openapi.json",
        "POST /v1/audio/transcriptions", "GET /v1/models", "GET /v1/models/{model}"}
    assert json.loads(SPEC_JSON) == SPEC


def test_every_error_is_declared_as_json_with_error_and_detail():
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            exempt = path in ("/healthz", "/readyz")
            assert (op.get("security") == []) == exempt, (method, path)
            if not exempt:
                assert "401" in op["responses"], (method, path)
            for code, resp in op["responses"].items():
                if int(code) >= 400:
                    assert list(resp["content"]) == ["application/json"], (method, path, code)
    err = SPEC["components"]["schemas"]["Error"]
    assert err["required"] == ["error", "detail"]
    oai = SPEC["components"]["schemas"]["OpenAIError"]["properties"]["error"]  # under /v1/
    assert oai["required"] == ["message", "type", "param", "code"]


def test_the_resource_serves_the_document():
    import falcon
    import falcon.testing

    app = falcon.App()
    app.add_route("/openapi.json", OpenAPIResource())
    result = falcon.testing.TestClient(app).simulate_get("/openapi.json")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("application/json")
    assert result.json == SPEC


# -- bodies for the audio media types ---------------------------------------------------------

def _wav(samples: list[int], rate: int = 16000, channels: int = 1) -> bytes:
    data = struct.pack(f"<{len(samples)}h", *samples)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " +
            struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)


S16 = st.lists(st.integers(-32768, 32767), max_size=2000)
raw_s16 = st.one_of(S16.map(lambda xs: struct.pack(f"<{len(xs)}h", *xs)),
                    st.binary(max_size=64))
raw_f32 = st.one_of(
    st.lists(st.floats(-2, 2, width=32), max_size=1000).map(
        lambda xs: np.asarray(xs, "<f4").tobytes()),
    st.lists(st.floats(width=32), max_size=50).map(lambda xs: np.asarray(xs, "<f4").tobytes()),
    st.binary(max_size=64))
wav = st.one_of(S16.map(_wav),
                st.builds(_wav, S16, st.sampled_from([8000, 16000, 44100]),
                          st.sampled_from([1, 2])),
                S16.map(_wav).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
                st.binary(max_size=64))


def _register_media_types() -> None:
    schemathesis.openapi.media_type("audio/wav", wav)
    schemathesis.openapi.media_type("audio/L16", raw_s16)
    schemathesis.openapi.media_type("application/octet-stream", raw_s16)
    schemathesis.openapi.media_type("audio/x-f32le", raw_f32)


_register_media_types()


# -- the app and the schema ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_app():
    whisper = 0 if whisper_missing() else 1  # as the daemon's default, where it can
    with InProc(stream_idle_timeout=2, max_streams=64, max_body_bytes=1 << 20,
                auth_token=TOKEN, whisper_workers=whisper) as d:
        yield d


@pytest.fixture(scope="module")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _schema():
    """SPEC, with the examples per operation bounded. It is loaded from the module, not from
    the server's /openapi.json: schemathesis.pytest.from_fixture (the lazy loader) fails under
    pytest 9 (it sets Function._nodeid, which pytest 9 removed); the test below checks that
    the server serves this very document."""
    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": EXAMPLES, "deterministic": True,
                       "allow-extra-parameters": False},
        "phases": {"coverage": {"enabled": False}},
    })
    return schemathesis.openapi.from_dict(SPEC, config=config)


schema = _schema()


def test_the_server_serves_the_same_document(fuzz_app, auth_headers):
    status, headers, raw = fuzz_app.request("GET", "/openapi.json", headers=auth_headers)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(raw) == SPEC
    assert fuzz_app.request("GET", "/openapi.json")[0] == 401  # the token is enforced


# -- the checks ----------------------------------------------------------------------------

def no_server_error(ctx, response, case) -> None:
    """No 5xx, except a capacity 503 that says when to retry."""
    code = response.status_code
    if code >= 500 and not (code == 503 and "retry-after" in response.headers):
        raise AssertionError(f"server error {code}: "
                             f"{response.content[:500].decode(errors='replace')}")


def errors_are_json(ctx, response, case) -> None:
    """JSON {"error", "detail"}; under /v1/ OpenAI's {"error": {"message", ...}}."""
    if response.status_code < 400:
        return
    ctype = (response.headers.get("content-type") or [""])[0]
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if case.path.startswith("/v1/") and isinstance(body, dict):
        err = body.get("error")
        body = {"error": "", "detail": err.get("message")} if isinstance(err, dict) else None
    if not (ctype.startswith("application/json") and isinstance(body, dict)
            and isinstance(body.get("error"), str) and isinstance(body.get("detail"), str)):
        raise AssertionError(f"error {response.status_code} is not JSON error+detail: "
                             f"{ctype}: {response.content[:300]!r}")


def stream_errors_in_band(ctx, response, case) -> None:
    """A 200 NDJSON answer ends with a final line or an error line, never mid-air."""
    ctype = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not ctype.startswith("application/x-ndjson"):
        return
    last = json.loads(response.content.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    if not (last.get("final") is True or {"error", "detail"} <= set(last)):
        raise AssertionError(f"NDJSON ends mid-stream: {str(last)[:300]}")


CHECKS = [no_server_error, errors_are_json, stream_errors_in_band, status_code_conformance,
          content_type_conformance, response_schema_conformance, negative_data_rejection,
          unsupported_method]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_api(case, fuzz_app, auth_headers):
    checks = [*CHECKS, ignored_auth]  # the token is enforced: a request without it gets 401
    # WSGI, in-process: the operation's app is what the auth probes are sent to as well
    case.operation.app = case.operation.schema.app = fuzz_app.app
    case.call_and_validate(headers=auth_headers, checks=checks)


def test_service_is_healthy_after_fuzzing(fuzz_app):
    """Runs after the fuzzing above (file order): ready, no stream or slot left behind."""
    d = fuzz_app
    assert d.request("GET", "/readyz")[0] == 200
    assert d.post_json("/process", {"message": "ok"}, timeout=10)[0] == 401  # no token

    def clean():
        info = d.status()
        s = info["slots"]
        return (info["streams"]["open"] == 0 and s["free"] + s["parked"] == s["total"]
                and all(w["streams"] == 0 for w in info["workers"])
                and all(w["state"] == "ready" and w["restarts"] == 0 for w in info["workers"]))

    wait_for(clean, timeout=10, what="no stream or slot left after fuzzing (idle timeout 2 s)")
    assert "Traceback" not in d.log(), d.log()[-3000:]
