"""Straight-line DFT-20 code for the CUDA kernel (generated, then compiled by NVRTC).

The frames kernel splits the 400-point DFT into two passes of DFT-20s (see
``_kernels``). Each DFT-20 here is a prime-factor (Good-Thomas) 4 x 5 transform: five
DFT-4s and four DFT-5s with no twiddles in between, every constant a literal, every
multiplication by 0 or +-1 left out and every output nobody reads dropped. That is
about a third of the instructions of the direct folded sums (and a little more
accurate). The same operation list is emitted as CUDA C and evaluated in Python, so
the tests check the generated program itself against ``numpy.fft``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

Real: TypeAlias = "float | str"  # a literal constant (0.0 is "nothing") or a variable's name


@dataclass
class Program:
    """A straight-line program: ``lines`` of ``(target, expression)``, expressions over
    earlier targets and the inputs, in C syntax that Python evaluates the same way
    (``fmaf`` is supplied when evaluating)."""

    prefix: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0

    def emit(self, expression: str) -> str:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        self.lines.append((name, expression))
        return name

    # real arithmetic with literal folding; a variable may carry a leading "-"
    @staticmethod
    def neg(a: Real) -> Real:
        if isinstance(a, float):
            return -a
        return a[1:] if a.startswith("-") else "-" + a

    def add(self, a: Real, b: Real) -> Real:
        if isinstance(a, float) and isinstance(b, float):
            return a + b
        if a == 0.0:
            return b
        if b == 0.0:
            return a
        if isinstance(b, str) and b.startswith("-"):
            return self.emit(f"{_c(a)} - {b[1:]}")
        return self.emit(f"{_c(a)} + {_c(b)}")

    def sub(self, a: Real, b: Real) -> Real:
        return self.add(a, self.neg(b))

    def mul(self, c: float, a: Real) -> Real:
        """c * a for a literal c."""
        if isinstance(a, float):
            return c * a
        if c == 0.0:
            return 0.0
        if c == 1.0:
            return a
        if c == -1.0:
            return self.neg(a)
        return self.emit(f"{_c(c)} * {_c(a)}")

    def fma(self, c: float, a: Real, b: Real) -> Real:
        """c * a + b for a literal c (one fmaf where neither side folds away)."""
        if c == 0.0 or a == 0.0:
            return b
        if c in (1.0, -1.0) or isinstance(a, float):
            return self.add(self.mul(c, a), b)
        if b == 0.0:
            return self.mul(c, a)
        return self.emit(f"fmaf({_c(c)}, {_c(a)}, {_c(b)})")

    # complex values are (re, im) pairs
    def cadd(self, a: tuple[Real, Real], b: tuple[Real, Real]) -> tuple[Real, Real]:
        return self.add(a[0], b[0]), self.add(a[1], b[1])

    def csub(self, a: tuple[Real, Real], b: tuple[Real, Real]) -> tuple[Real, Real]:
        return self.sub(a[0], b[0]), self.sub(a[1], b[1])


def _c(v: Real) -> str:
    """A value in C syntax: float literals with an f suffix, names as they are."""
    if isinstance(v, float):
        return f"({float(v)!r}f)" if v < 0 else f"{float(v)!r}f"
    return f"({v})" if v.startswith("-") else v


def _exact(x: float) -> float:
    """cos/sin values that are 0 or +-1 up to rounding, made exact."""
    for e in (0.0, 1.0, -1.0, 0.5, -0.5):
        if abs(x - e) < 1e-12:
            return e
    return x


def _dft_small(p: Program, x: list[tuple[Real, Real]]) -> list[tuple[Real, Real]]:
    """Direct DFT of N = len(x) points, folding the pairs (n, N - n) first."""
    n = len(x)
    half = (n - 1) // 2
    s = [p.cadd(x[j], x[n - j]) for j in range(1, half + 1)]
    d = [p.csub(x[j], x[n - j]) for j in range(1, half + 1)]
    mid = x[n // 2] if n % 2 == 0 else (0.0, 0.0)
    base = [p.cadd(x[0], mid), p.csub(x[0], mid)]  # k even, k odd
    out: list[tuple[Real, Real] | None] = [None] * n
    for k in range(n // 2 + 1):
        re_, im_ = base[k % 2] if n % 2 == 0 else base[0]
        ur: Real = 0.0  # sum of sin * d (the part multiplied by -i)
        ui: Real = 0.0
        for j in range(1, half + 1):
            c = _exact(math.cos(2 * math.pi * j * k / n))
            sn = _exact(math.sin(2 * math.pi * j * k / n))
            re_ = p.fma(c, s[j - 1][0], re_)
            im_ = p.fma(c, s[j - 1][1], im_)
            ur = p.fma(sn, d[j - 1][0], ur)
            ui = p.fma(sn, d[j - 1][1], ui)
        # X[k] = R - i U, X[n - k] = R + i U, with -i (ur + i ui) = ui - i ur
        out[k] = (p.add(re_, ui), p.sub(im_, ur))
        if 0 < k and n - k != k:
            out[n - k] = (p.sub(re_, ui), p.add(im_, ur))
    return out  # type: ignore[return-value]


def dft20(p: Program, x: list[tuple[Real, Real]]) -> list[tuple[Real, Real]]:
    """All 20 outputs of a DFT-20 by the prime-factor map 20 = 4 x 5:
    n = (5 n1 + 4 n2) mod 20, k = (5 k1 + 16 k2) mod 20, X[k] = DFT4_n1 DFT5_n2."""
    inner = [_dft_small(p, [x[(5 * n1 + 4 * n2) % 20] for n2 in range(5)]) for n1 in range(4)]
    out: list[tuple[Real, Real] | None] = [None] * 20
    for k2 in range(5):
        col = _dft_small(p, [inner[n1][k2] for n1 in range(4)])
        for k1 in range(4):
            out[(5 * k1 + 16 * k2) % 20] = col[k1]
    return out  # type: ignore[return-value]


def _pruned(p: Program, outputs: dict[str, Real]) -> list[str]:
    """C statements computing ``outputs`` (name -> value), dead lines dropped."""
    needed = {v.lstrip("-") for v in outputs.values() if isinstance(v, str)}
    keep = []
    for name, expression in reversed(p.lines):
        if name in needed:
            keep.append((name, expression))
            needed.update(tok for tok in _names(expression) if tok.startswith(p.prefix))
    keep.reverse()
    body = [f"const float {name} = {expression};" for name, expression in keep]
    body += [f"{target} = {_c(value)};" for target, value in outputs.items()]
    return body


def _names(expression: str) -> list[str]:
    out, word = [], ""
    for ch in expression + " ":
        if ch.isalnum() or ch == "_":
            word += ch
        else:
            if word:
                out.append(word)
            word = ""
    return out


def stage1_code() -> list[str]:
    """Real DFT-20 of ``xr[0..19]`` -> ``ar[k], ai[k]`` for k = 0..10 (the rest are
    conjugates). Outputs with k = 3 (mod 4) are taken as conj(X[20 - k]), so the
    transform of the fourth residue class is never computed."""
    p = Program("s1_")
    x = [(f"xr[{n}]", 0.0) for n in range(20)]
    X = dft20(p, x)
    outputs: dict[str, Real] = {}
    for k in range(11):
        re_, im_ = X[k] if k % 4 != 3 else (X[20 - k][0], Program.neg(X[20 - k][1]))
        outputs[f"ar[{k}]"] = re_
        outputs[f"ai[{k}]"] = im_
    return _pruned(p, outputs)


def stage2_code() -> list[str]:
    """Complex DFT-20 of ``br[0..19] + i bi[0..19]`` -> ``pw[k] = |X[k]|^2`` for
    k = 0..10 (as ``xre[k]``, ``xim[k]``; the caller squares)."""
    p = Program("s2_")
    x = [(f"br[{n}]", f"bi[{n}]") for n in range(20)]
    X = dft20(p, x)
    outputs: dict[str, Real] = {}
    for k in range(11):
        outputs[f"xre[{k}]"] = X[k][0]
        outputs[f"xim[{k}]"] = X[k][1]
    return _pruned(p, outputs)


def evaluate(lines: list[str], env: dict[str, object]) -> dict[str, object]:
    """Run generated C statements in Python (float64, or numpy float32 arrays) - for tests."""
    import re

    def fmaf(a: object, b: object, c: object) -> object:
        return a * b + c  # type: ignore[operator]

    scope = dict(env, fmaf=fmaf)
    for line in lines:
        text = re.sub(r"(\d)f\b", r"\1", line.rstrip(";")).replace("const float ", "")
        exec(text, {}, scope)  # noqa: S102 - our own generated arithmetic
    return scope


def operation_count(lines: list[str]) -> int:
    """Arithmetic instructions of a generated program (one per statement with an
    operator; output copies are free)."""
    return sum(1 for line in lines if line.startswith("const float"))


def window_code(mode: str) -> str:
    """Stage 1's windowed samples: the Hann window loaded (``"table"``), or computed as
    sin^2(pi n / 400) = (sin(pi n1 / 20) cos(pi r / 400) + cos(pi n1 / 20) sin(pi r / 400))^2
    for n = 20 n1 + r, literals times two per-thread values (``"sincos"``: no loads)."""
    if mode == "table":
        return ("#pragma unroll\n        for (int n1 = 0; n1 < 20; ++n1)\n"
                "            xr[n1] = sm[f1 * SST + 20 * n1 + SPAD * (n1 / 8) + r1] * window[20 * n1 + r1];")
    lines = ["        float sb, cb;", "        sincospif((float)r1 / 400.0f, &sb, &cb);"]
    for n1 in range(20):
        sa, ca = float(np.float32(np.sin(np.pi * n1 / 20))), float(np.float32(np.cos(np.pi * n1 / 20)))
        if n1 == 0:
            w = "sb"
        elif n1 == 10:
            w = "cb"
        else:
            w = f"fmaf({sa!r}f, cb, {ca!r}f * sb)"
        lines.append(f"        {{ const float w = {w}; xr[{n1}] = sm[f1 * SST + {20 * n1} + SPAD * {n1 // 8} + r1] * (w * w); }}")
    return "\n".join(lines)


def twiddle_code(step: int) -> tuple[str, str]:
    """(setup, per-k1 load) of stage 1's twiddles e^(-2 pi i r k1 / 400): each loaded
    (step 1), or loaded at k1 = 1, 1 + step, ... and multiplied by the k1 = 1 twiddle in
    between (fewer loads, a few ulps more rounding)."""
    if step <= 1:
        return "", "            const float2 tw = twiddle[k1 * 20 + r1];"
    setup = "        const float2 w1 = twiddle[20 + r1];\n        float2 tw = w1;"
    load = (f"            if ((k1 - 1) % {step} == 0) tw = twiddle[k1 * 20 + r1];\n"
            "            else tw = make_float2(fmaf(tw.x, w1.x, -(tw.y * w1.y)), fmaf(tw.x, w1.y, tw.y * w1.x));")
    return setup, load
