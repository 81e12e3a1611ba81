"""CUDA C++ source of the mel kernels (compiled by CuPy's NVRTC at engine start).

``shmmel_mel_frames``: one block of 160 threads computes up to 8 consecutive frames of
one work item (a planned segment of one stream); one launch covers every item of a
``process`` call. Per frame, with n = 20 n1 + n2 and k = k1 + 20 k2:

    A[n2][k1] = sum_n1 w x[20 n1 + n2] e^(-2 pi i n1 k1 / 20)   stage 1: 20 real DFT-20s
    B[n2][k1] = A[n2][k1] e^(-2 pi i n2 k1 / 400)                twiddle
    X[k1 + 20 k2] = sum_n2 B[n2][k1] e^(-2 pi i n2 k2 / 20)      stage 2: bins 0..200 only

Both DFT-20s fold the symmetric terms (n and 20 - n) first. Power, the mel sum over
each filter's support (a fixed-order fmaf chain) and log10 (``__log2f * log10(2)``,
within about 1e-6 of log10f) follow; a frame's bits depend only on its 400 samples.
Samples are read once per tile (int16 converted in the kernel) and each output value is
written once. The per-item max is an atomicMax on order-preserving integer
images of the floats (max is exact in any order, so this stays deterministic).

Descriptor (16 int64 per item): see the D_* names below and ``cuda.py``.
"""

from __future__ import annotations

import numpy as np

FRAMES_PER_BLOCK = 8
THREADS = 20 * FRAMES_PER_BLOCK

D_PRE, D_BODY, D_POST, D_OUT = 0, 1, 2, 3
D_PRE_LEN, D_BODY_LEN, D_ZERO_LEN, D_POST_LEN = 4, 5, 6, 7
D_BODY_I16, D_N_MELS, D_N_FRAMES, D_OUT_FS, D_OUT_MS, D_MAX_INDEX = 8, 9, 10, 11, 12, 13
D_REFLECT = 14  # 1: an offline clip; pre/post are the body's reflections, read in place
D_FIELDS = 16

_TEMPLATE = r"""
#define FPB %(fpb)d
#define MEL_ILP %(mel_ilp)d
#define NTHREADS %(threads)d
#define BS 436   /* frame stride of B: 20 rows of 21 (+16), 436 %% 32 == 20 */
#define PS 204   /* frame stride of the power spectrum */

__constant__ float C20[20] = {%(cos20)s};
__constant__ float S20[20] = {%(sin20)s};

__device__ __forceinline__ unsigned int ordered_bits(float v) {
    unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

/* One mel row of one frame: a fixed-order sum over the filter's support, then log10. */
__device__ __forceinline__ float mel_log10(const float* p, const float* w, int len) {
    float acc = 0.0f;
    for (int j = 0; j < len; ++j) acc = fmaf(w[j], p[j], acc);
    return __log2f(fmaxf(acc, 1e-10f)) * 0.30102999566398120f;  /* log10 */
}

__device__ __forceinline__ float body_at(const long long* d, long long i) {
    if (d[%(D_BODY_I16)d]) return (float)((const short*)d[%(D_BODY)d])[i] * 3.0517578125e-05f;
    return ((const float*)d[%(D_BODY)d])[i];
}

/* Sample s of an item's segment: pre | body | zeros | post, laid end to end. With
   D_REFLECT the segment is Whisper's whole padded clip xp (pre and post lengths 200):
   xp[s] = x[200 - s], xp[Lp + 200 + j] = x[Lp - 2 - j] over x with Lp - L zeros
   appended, zero where that index has no sample (the planner's definition). */
__device__ __forceinline__ float fetch(const long long* d, long long s) {
    if (d[%(D_REFLECT)d]) {
        const long long n = d[%(D_BODY_LEN)d], lp = n + d[%(D_ZERO_LEN)d];
        const long long i = s < 200 ? 200 - s : (s < lp + 200 ? s - 200 : 2 * lp + 198 - s);
        return (i >= 0 && i < n) ? body_at(d, i) : 0.0f;
    }
    if (s < d[%(D_PRE_LEN)d]) return ((const float*)d[%(D_PRE)d])[s];
    s -= d[%(D_PRE_LEN)d];
    if (s < d[%(D_BODY_LEN)d]) return body_at(d, s);
    s -= d[%(D_BODY_LEN)d];
    if (s < d[%(D_ZERO_LEN)d]) return 0.0f;
    s -= d[%(D_ZERO_LEN)d];
    return s < d[%(D_POST_LEN)d] ? ((const float*)d[%(D_POST)d])[s] : 0.0f;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, %(min_blocks)d)
shmmel_mel_frames(const long long* __restrict__ desc, const int* __restrict__ tile_starts,
                  int n_items, const float* __restrict__ window,
                  const float2* __restrict__ twiddle,
                  const int* __restrict__ tab80, const float* __restrict__ w80,
                  const int* __restrict__ tab128, const float* __restrict__ w128,
                  unsigned int* __restrict__ item_max, unsigned int* __restrict__ bad)
{
    __shared__ float sm[2 * FPB * BS];
    __shared__ long long sd[%(D_FIELDS)d];
    __shared__ int s_item;
    const int tid = threadIdx.x;
    const int tile = blockIdx.x;

    if (tid == 0) {
        int lo = 0, hi = n_items - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (tile_starts[mid] <= tile) lo = mid; else hi = mid - 1;
        }
        s_item = lo;
    }
    __syncthreads();
    const int item = s_item;
    if (tid < %(D_FIELDS)d) sd[tid] = desc[(long long)item * %(D_FIELDS)d + tid];
    __syncthreads();

    const int f0 = (tile - tile_starts[item]) * FPB;
    const int left = (int)sd[%(D_N_FRAMES)d] - f0;
    const int nf = left < FPB ? left : FPB;

    /* phase 0: the tile's samples (unwindowed), sm[e] = segment[160 f0 + e]; a direct
       copy where the tile lies inside the chunk, else piece by piece */
    const long long base = (long long)f0 * 160;
    const int span = (nf - 1) * 160 + 400;
    const long long body0 = sd[%(D_PRE_LEN)d], body1 = body0 + sd[%(D_BODY_LEN)d];
    bool nonfinite = false;  /* float input: NaN/Inf flagged per item when bad != 0 */
    if (base >= body0 && base + span <= body1) {
        if (sd[%(D_BODY_I16)d]) {
            const short* p = (const short*)sd[%(D_BODY)d] + (base - body0);
            for (int e = tid; e < span; e += NTHREADS) sm[e] = (float)p[e] * 3.0517578125e-05f;
        } else {
            const float* p = (const float*)sd[%(D_BODY)d] + (base - body0);
            for (int e = tid; e < span; e += NTHREADS) {
                const float v = p[e];
                nonfinite |= !isfinite(v);
                sm[e] = v;
            }
        }
    } else {
        for (int e = tid; e < span; e += NTHREADS) {
            const float v = fetch(sd, base + e);
            nonfinite |= !isfinite(v);
            sm[e] = v;
        }
    }
    if (__syncthreads_or(nonfinite) && tid == 0 && bad != nullptr)
        atomicOr(bad + sd[%(D_MAX_INDEX)d], 1u);

    const int f = tid / 20;
    const int r = tid - f * 20;   /* n2 in stage 1, k1 in stage 2 */
    const bool act = f < nf;
    float* sbr = sm;
    float* sbi = sm + FPB * BS;

    /* stage 1: thread (f, n2) -> B[n2][k1], k1 = 0..19 */
    float xr[20];
    if (act) {
#pragma unroll
        for (int n1 = 0; n1 < 20; ++n1) xr[n1] = sm[f * 160 + 20 * n1 + r] * window[20 * n1 + r];
    }
    __syncthreads();
    if (act) {
        float su[10], df[10];
#pragma unroll
        for (int n1 = 1; n1 < 10; ++n1) {
            su[n1] = xr[n1] + xr[20 - n1];
            df[n1] = xr[n1] - xr[20 - n1];
        }
        float ar[11], ai[11];
#pragma unroll
        for (int k1 = 0; k1 <= 10; ++k1) {
            float re = xr[0] + ((k1 & 1) ? -xr[10] : xr[10]);
            float im = 0.0f;
#pragma unroll
            for (int n1 = 1; n1 < 10; ++n1) {
                const int j = (n1 * k1) %% 20;
                re = fmaf(su[n1], C20[j], re);
                im = fmaf(-df[n1], S20[j], im);
            }
            ar[k1] = re;
            ai[k1] = im;
        }
#pragma unroll
        for (int k1 = 0; k1 < 20; ++k1) {
            const float a = k1 <= 10 ? ar[k1] : ar[20 - k1];
            const float b = k1 <= 10 ? ai[k1] : -ai[20 - k1];
            const float2 tw = twiddle[k1 * 20 + r];
            sbr[f * BS + r * 21 + k1] = fmaf(a, tw.x, -(b * tw.y));
            sbi[f * BS + r * 21 + k1] = fmaf(a, tw.y, b * tw.x);
        }
    }
    __syncthreads();

    /* stage 2: thread (f, k1) -> |X[k1 + 20 k2]|^2, k2 = 0..10 */
    float pw[11];
    if (act) {
        float b0r = sbr[f * BS + r], b0i = sbi[f * BS + r];
        float b10r = sbr[f * BS + 10 * 21 + r], b10i = sbi[f * BS + 10 * 21 + r];
        float sre[10], sim[10], dre[10], dim[10];
#pragma unroll
        for (int n2 = 1; n2 < 10; ++n2) {
            const float pr = sbr[f * BS + n2 * 21 + r], pi = sbi[f * BS + n2 * 21 + r];
            const float qr = sbr[f * BS + (20 - n2) * 21 + r], qi = sbi[f * BS + (20 - n2) * 21 + r];
            sre[n2] = pr + qr; sim[n2] = pi + qi;
            dre[n2] = pr - qr; dim[n2] = pi - qi;
        }
#pragma unroll
        for (int k2 = 0; k2 <= 10; ++k2) {
            float re = b0r + ((k2 & 1) ? -b10r : b10r);
            float im = b0i + ((k2 & 1) ? -b10i : b10i);
#pragma unroll
            for (int n2 = 1; n2 < 10; ++n2) {
                const int j = (n2 * k2) %% 20;
                re = fmaf(C20[j], sre[n2], re);
                re = fmaf(S20[j], dim[n2], re);
                im = fmaf(C20[j], sim[n2], im);
                im = fmaf(-S20[j], dre[n2], im);
            }
            pw[k2] = fmaf(re, re, im * im);
        }
    }
    __syncthreads();
    float* sp = sm;
    if (act) {
#pragma unroll
        for (int k2 = 0; k2 <= 10; ++k2) {
            const int k = r + 20 * k2;
            if (k <= 200) sp[f * PS + k] = pw[k2];
        }
    }
    __syncthreads();

    /* mel rows (fixed-order sums over each filter's support), log10, max */
    const int n_mels = (int)sd[%(D_N_MELS)d];
    const int* tab = n_mels == 128 ? tab128 : tab80;
    const float* wts = n_mels == 128 ? w128 : w80;
    float* out = (float*)sd[%(D_OUT)d];
    const long long fs = sd[%(D_OUT_FS)d], ms = sd[%(D_OUT_MS)d];
    float lmax = __int_as_float(0xff800000);  /* -inf */
    if (ms == 1) {
#if MEL_ILP
        /* frame-major output: thread (g, m) sums mel row m for frames g*per ..
           g*per+per-1 at once: one weight load feeds up to FPB independent fmaf chains,
           each in the fixed order j = 0..len-1 (the same bits as one chain at a time);
           a warp stores consecutive mels of a frame */
        const int groups = NTHREADS / n_mels;        /* 2 for 80 mels, 1 for 128 */
        const int per = (FPB + groups - 1) / groups;
        if (tid < groups * n_mels) {
            const int g = tid / n_mels, m = tid - g * n_mels;
            const int start = tab[3 * m], len = tab[3 * m + 1], off = tab[3 * m + 2];
            const int fa = g * per;
            const float* row = sp + fa * PS + start;
            float acc[FPB];
#pragma unroll
            for (int q = 0; q < FPB; ++q) acc[q] = 0.0f;
            for (int j = 0; j < len; ++j) {
                const float w = wts[off + j];
#pragma unroll
                for (int q = 0; q < FPB; ++q)
                    if (q < per) acc[q] = fmaf(w, row[q * PS + j], acc[q]);
            }
#pragma unroll
            for (int q = 0; q < FPB; ++q) {
                const int ff = fa + q;
                if (q < per && ff < nf) {
                    const float l = __log2f(fmaxf(acc[q], 1e-10f)) * 0.30102999566398120f;
                    out[(long long)(f0 + ff) * fs + m] = l;
                    lmax = fmaxf(lmax, l);
                }
            }
        }
#else
        /* frame-major output: a thread keeps one mel row over several frames, so a
           warp stores consecutive mels of a frame */
        const int groups = NTHREADS / n_mels;        /* 2 for 80 mels, 1 for 128 */
        if (tid < groups * n_mels) {
            const int g = tid / n_mels, m = tid - g * n_mels;
            const int start = tab[3 * m], len = tab[3 * m + 1], off = tab[3 * m + 2];
            for (int ff = g; ff < nf; ff += groups) {
                const float l = mel_log10(sp + ff * PS + start, wts + off, len);
                out[(long long)(f0 + ff) * fs + m] = l;
                lmax = fmaxf(lmax, l);
            }
        }
#endif
    } else {
        /* mel-major output: 8 neighbouring threads store the tile's 8 frames of a row */
        for (int e = tid; e < FPB * n_mels; e += NTHREADS) {
            const int ff = e %% FPB, m = e / FPB;
            if (ff < nf) {
                const int start = tab[3 * m], len = tab[3 * m + 1], off = tab[3 * m + 2];
                const float l = mel_log10(sp + ff * PS + start, wts + off, len);
                out[(long long)(f0 + ff) * fs + (long long)m * ms] = l;
                lmax = fmaxf(lmax, l);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, o));
    if ((tid & 31) == 0 && lmax > __int_as_float(0xff800000))
        atomicMax(item_max + sd[%(D_MAX_INDEX)d], ordered_bits(lmax));
}

/* In place, per item of a descriptor table: each item's output (contiguous, n_frames x
   n_mels floats at D_OUT) normalised with its own max. Grid (x, y): y strides items. */
extern "C" __global__ void
shmmel_normalise_items(const long long* __restrict__ desc, const unsigned int* __restrict__ item_max,
                       int n_items)
{
    for (int item = blockIdx.y; item < n_items; item += gridDim.y) {
        const long long* d = desc + (long long)item * %(D_FIELDS)d;
        float4* x = (float4*)d[%(D_OUT)d];
        const long long n4 = d[%(D_N_FRAMES)d] * d[%(D_N_MELS)d] / 4;
        const float floor = from_ordered_bits(item_max[d[%(D_MAX_INDEX)d]]) - 8.0f;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
             i += (long long)gridDim.x * blockDim.x) {
            float4 v = x[i];
            v.x = (fmaxf(v.x, floor) + 4.0f) / 4.0f;
            v.y = (fmaxf(v.y, floor) + 4.0f) / 4.0f;
            v.z = (fmaxf(v.z, floor) + 4.0f) / 4.0f;
            v.w = (fmaxf(v.w, floor) + 4.0f) / 4.0f;
            x[i] = v;
        }
    }
}

/* max bits -> float32 */
extern "C" __global__ void
shmmel_decode_max(const unsigned int* __restrict__ bits, float* __restrict__ out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_ordered_bits(bits[i]);
}
"""


def _literal(values: np.ndarray) -> str:
    return ", ".join(f"{float(v)!r}f" for v in values.astype(np.float32))


def kernel_source(frames_per_block: int = FRAMES_PER_BLOCK, min_blocks: int = 7, mel_ilp: bool = True) -> str:
    """The CUDA source with the DFT-20 constants filled in (exact zeros and ones where
    cos/sin are). ``frames_per_block`` (7..13: 128 mel rows need 128 threads, the static
    shared memory must stay under 48 KB), ``min_blocks`` (the launch bound) and
    ``mel_ilp`` (frame-major mel sums several frames at a time) are tuning knobs. Within
    one build a frame's bits depend only on its samples (streaming equals offline);
    another ``frames_per_block`` may round differently (the compiler's contractions)."""
    if not 7 <= frames_per_block <= 13:
        raise ValueError(f"frames_per_block must be 7..13, got {frames_per_block}")
    angle = 2.0 * np.pi * np.arange(20) / 20
    cos20, sin20 = np.cos(angle), np.sin(angle)
    cos20[np.abs(cos20) < 1e-12] = 0.0
    sin20[np.abs(sin20) < 1e-12] = 0.0
    fields = {name: value for name, value in globals().items() if name.startswith("D_")}
    return _TEMPLATE % dict(
        fpb=frames_per_block,
        threads=20 * frames_per_block,
        min_blocks=min_blocks,
        mel_ilp=int(mel_ilp),
        cos20=_literal(cos20),
        sin20=_literal(sin20),
        **fields,
    )


def twiddles() -> np.ndarray:
    """(20 k1 x 20 n2) complex e^(-2 pi i n2 k1 / 400) as interleaved float32 pairs."""
    k1, n2 = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    angle = 2.0 * np.pi * (n2 * k1) / 400.0
    pairs = np.stack([np.cos(angle), -np.sin(angle)], axis=-1)
    return np.ascontiguousarray(pairs.astype(np.float32).reshape(-1))
