"""The generated DFT-20 programs of the CUDA kernel (``mel._dft``), checked on the CPU:
the very statements NVRTC compiles are evaluated in Python against ``numpy.fft``."""

from __future__ import annotations

import numpy as np
import pytest

from shmmel.mel import _dft, _kernels


@pytest.mark.parametrize("seed", range(4))
def test_stage1_is_the_real_dft20(seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(20)
    scope = _dft.evaluate(_dft.stage1_code(), {"xr": list(x), "ar": [0.0] * 11, "ai": [0.0] * 11})
    got = np.array(scope["ar"]) + 1j * np.array(scope["ai"])
    np.testing.assert_allclose(got, np.fft.fft(x)[:11], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_stage2_is_the_complex_dft20(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(20) + 1j * rng.standard_normal(20)
    scope = _dft.evaluate(_dft.stage2_code(), {"br": list(z.real), "bi": list(z.imag),
                                               "xre": [0.0] * 11, "xim": [0.0] * 11})
    got = np.array(scope["xre"]) + 1j * np.array(scope["xim"])
    np.testing.assert_allclose(got, np.fft.fft(z)[:11], rtol=0, atol=1e-12)


def test_generated_code_is_shorter_than_the_direct_sums() -> None:
    """The folded direct sums cost 9 x 11 x 2 + 18 (real) and 9 x 11 x 4 + 36 (complex)
    operations; the prime-factor programs need about half of that (110 and 206)."""
    assert _dft.operation_count(_dft.stage1_code()) <= 0.55 * (9 * 11 * 2 + 18)
    assert _dft.operation_count(_dft.stage2_code()) <= 0.55 * (9 * 11 * 4 + 36)


def test_every_generated_temporary_is_used() -> None:
    for lines in (_dft.stage1_code(), _dft.stage2_code()):
        names = [line.split()[2] for line in lines if line.startswith("const float")]
        text = "\n".join(lines)
        for name in names:
            assert text.count(name + " ") + text.count(name + ")") + text.count(name + ",") + text.count(
                name + ";") >= 2, name


def test_float32_rounding_stays_small() -> None:
    """In float32 the generated stages stay within a few ulps of the float64 transform."""
    x = np.random.default_rng(7).standard_normal(20).astype(np.float32)
    scope = _dft.evaluate(_dft.stage1_code(), {"xr": list(x), "ar": [0.0] * 11, "ai": [0.0] * 11})
    got = np.array(scope["ar"], np.float32) + 1j * np.array(scope["ai"], np.float32)
    assert np.abs(got - np.fft.fft(x.astype(np.float64))[:11]).max() < 1e-5


def test_kernel_source_knobs() -> None:
    assert "s1_" in _kernels.kernel_source() and "s2_" in _kernels.kernel_source()
    assert "s1_" not in _kernels.kernel_source(dft="direct")
    with pytest.raises(ValueError, match="dft"):
        _kernels.kernel_source(dft="fft")
    assert "sincospif" in _kernels.kernel_source() and "window[" not in _kernels.kernel_source()
    assert "window[" in _kernels.kernel_source(window="table")
    assert _kernels.kernel_source(twiddle_step=1).count("twiddle[") == 1
    # the spread normalisation's blocks take their logical index from a ticket, not blockIdx.x
    assert "atomicAdd(done + n_items, 1u)" in _kernels.kernel_source()
    assert "const int tile = blockIdx.x" not in _kernels.kernel_source()
    with pytest.raises(ValueError, match="window"):
        _kernels.kernel_source(window="hamming")
    with pytest.raises(ValueError, match="twiddle_step"):
        _kernels.kernel_source(twiddle_step=0)


def test_generated_window_and_twiddles_match_their_definitions() -> None:
    """The window expression of the "sincos" build and the twiddle recurrence, evaluated
    in float32 as the kernel does, stay within a few ulps of the exact values."""
    f = np.float32
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    pairs = _kernels.twiddles().reshape(20, 20, 2)
    for r in range(20):
        sb, cb = f(np.sin(np.pi * r / 400)), f(np.cos(np.pi * r / 400))
        for n1 in range(20):
            w = sb if n1 == 0 else cb if n1 == 10 else f(f(np.sin(np.pi * n1 / 20)) * cb + f(f(np.cos(np.pi * n1 / 20)) * sb))
            assert abs(f(w * w) - hann[20 * n1 + r]) < 3e-7
        w1 = pairs[1, r]
        tw = w1.copy()
        for k1 in range(1, 20):
            if (k1 - 1) % _kernels.TWIDDLE_STEP == 0:
                tw = pairs[k1, r].copy()
            else:
                tw = np.array([f(tw[0] * w1[0] - f(tw[1] * w1[1])), f(tw[0] * w1[1] + f(tw[1] * w1[0]))], np.float32)
            assert abs(complex(tw[0], tw[1]) - np.exp(-2j * np.pi * r * k1 / 400)) < 4e-7
