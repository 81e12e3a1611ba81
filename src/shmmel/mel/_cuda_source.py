"""CUDA C++ text of the mel kernels: a %-template (``TEMPLATE``) that
``_kernels.kernel_source`` fills with the tuning values, the descriptor field indices
and the generated DFT code, and the folded direct DFT-20 stages of ``dft="direct"``.
See ``_kernels`` for what the kernels do."""

TEMPLATE = r"""
#define FPB %(fpb)d
#define MEL_ILP %(mel_ilp)d
#define NTHREADS %(threads)d
#define NORM_ILP 8  /* float4 loads in flight per thread in the last-block normalisation */
#define NORM_G %(norm_group)d  /* spread normalisation: one block in NORM_G normalises NORM_G chunks */
#define BS 436   /* frame stride of B: 20 rows of 21 (+16), 436 %% 32 == 20 */
#define PS %(ps)d   /* frame stride of the power spectrum (212 %% 32 == 20: stores conflict-free) */
#define SPAD %(spad)d   /* samples e stored at SIDX(e): a frame's 160-sample hop padded by SPAD */
#define SIDX(e) ((e) + SPAD * ((e) / 160))
#define SST (160 + SPAD)

__constant__ float C20[20] = {%(cos20)s};
__constant__ float S20[20] = {%(sin20)s};

__device__ __forceinline__ unsigned int ordered_bits(float v) {
    unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(unsigned int u) {
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ unsigned int ld_acquire(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %%0, [%%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned int ld_relaxed(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.relaxed.gpu.global.u32 %%0, [%%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* the item whose tiles hold tile t (tile_starts ascending, n_items + 1 entries) */
__device__ __forceinline__ int find_item(const int* __restrict__ tile_starts, int n_items, int t) {
    int lo = 0, hi = n_items - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (tile_starts[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The item of chunk ``chunk`` if the chunk begins a group of NORM_G of that item's
   chunks (the block that normalises the group), else -1. */
__device__ __forceinline__ int chunk_group_item(const int* __restrict__ tile_starts, int n_items, int chunk) {
    const int item = find_item(tile_starts, n_items, chunk);
    return (chunk - tile_starts[item]) %% NORM_G == 0 ? item : -1;
}

/* Spread normalisation, thread NTHREADS - 1 of a block with a group of chunks: where
   chunks q .. q + NORM_G - 1 of the item lie (the q-th of an item's T chunks is the q-th
   of T equal float4 ranges of its output) and, if the item's tiles are all counted
   already, its floor. */
__device__ __forceinline__ void chunk_prefetch(const long long* __restrict__ desc, const int* __restrict__ tile_starts,
                                               int item, int chunk, const unsigned int* item_max,
                                               const unsigned int* done, long long* nd, float* s_nlo,
                                               int* s_nready) {
    const long long* d = desc + (long long)item * %(D_FIELDS)d;
    const long long out = d[%(D_OUT)d], n4 = d[%(D_N_FRAMES)d] * d[%(D_N_MELS)d] / 4, mi = d[%(D_MAX_INDEX)d];
    const int t0 = tile_starts[item], t = tile_starts[item + 1] - t0, q = chunk - t0;
    nd[0] = out;
    nd[1] = (long long)q * n4 / t;
    nd[2] = (long long)(q + NORM_G < t ? q + NORM_G : t) * n4 / t;
    nd[3] = mi;
    nd[4] = t;
    const bool ready = ld_acquire(done + mi) >= (unsigned int)t;
    if (ready) *s_nlo = from_ordered_bits(ld_relaxed(item_max + mi)) - 8.0f;
    *s_nready = ready;
}

/* One mel row of one frame: a fixed-order sum over the filter's support, then log10. */
__device__ __forceinline__ float mel_log10(const float* p, const float* w, int len) {
    float acc = 0.0f;
    for (int j = 0; j < len; ++j) acc = fmaf(w[j], p[j], acc);
    return __log2f(fmaxf(acc, 1e-10f)) * 0.30102999566398120f;  /* log10 */
}

/* Mel rows of one tile, NM mels: thread (g, m) sums row m for frames g*PER ..
   g*PER+PER-1 at once, so one weight load feeds PER independent fmaf chains, each in
   the fixed order j = 0..len-1 (the bits of mel_log10, one chain at a time). Frame-major
   output (ms == 1) is stored here, a warp writing consecutive mels of a frame; mel-major
   output goes to stage[m * FPB + ff] for the caller to store coalesced. Returns the
   thread's max. */
template <int NM>
__device__ __forceinline__ float mel_tile(const float* sp, const int* __restrict__ tab,
                                          const float* __restrict__ wts, int tid, int nf, int f0,
                                          float* out, long long fs, long long ms, float* stage) {
    constexpr int G = NTHREADS / NM;
    constexpr int PER = (FPB + G - 1) / G;
    float lmax = __int_as_float(0xff800000);  /* -inf */
    const int g = tid / NM;
    if (g >= G) return lmax;
    const int m = tid - g * NM;
    const int start = tab[3 * m], len = tab[3 * m + 1], off = tab[3 * m + 2];
    const int fa = g * PER;
    const float* row = sp + fa * PS + start;
    float acc[PER];
#pragma unroll
    for (int q = 0; q < PER; ++q) acc[q] = 0.0f;
    for (int j = 0; j < len; ++j) {
        const float w = wts[off + j];
#pragma unroll
        for (int q = 0; q < PER; ++q) acc[q] = fmaf(w, row[q * PS + j], acc[q]);
    }
#pragma unroll
    for (int q = 0; q < PER; ++q) {
        const int ff = fa + q;
        if (ff < nf) {
            const float l = __log2f(fmaxf(acc[q], 1e-10f)) * 0.30102999566398120f;
            if (ms == 1) out[(long long)(f0 + ff) * fs + m] = l;
            else stage[m * FPB + ff] = l;
            lmax = fmaxf(lmax, l);
        }
    }
    return lmax;
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
                  unsigned int* __restrict__ item_max, unsigned int* __restrict__ bad,
                  unsigned int* __restrict__ done)
{
    __shared__ __align__(16) float sm[2 * FPB * BS];
    __shared__ long long sd[%(D_FIELDS)d];
    __shared__ long long nd[5];  /* spread normalisation: out, first and end float4, max index, tiles */
    __shared__ int s_item, s_last, s_nitem, s_nready, s_tile;
    __shared__ float s_nlo;
    const int tid = threadIdx.x;
    /* With ``done`` (n_items + 1 zeroed words) and a grid of n_tiles + lag blocks
       (lag >= every item's tile count), the block with logical index b computes tile b
       (if b < n_tiles) and then normalises chunk b - lag (if b >= lag): one tile's share
       of one item's output, once all the item's tiles are counted. lag == 0: the item's
       last block normalises all of it (no block waits; b is blockIdx.x).
       Forward progress: CUDA does not dispatch blocks in index order (MPS, preemption,
       concurrent kernels), so with lag > 0 b is not blockIdx.x but a ticket from the
       launch's counter done[n_items] (dynamic tile ids, as in Merrill & Garland's
       single-pass scan): the tiles a block waits for have lower tickets, taken by
       blocks already running, which count their tile before they wait on anything. */
    const int n_tiles = tile_starts[n_items];
    const int lag = done != nullptr ? (int)gridDim.x - n_tiles : 0;
    if (tid == 0) s_tile = lag > 0 ? (int)atomicAdd(done + n_items, 1u) : (int)blockIdx.x;
    __syncthreads();
    const int tile = s_tile;
    const int chunk = lag > 0 ? tile - lag : -1;

    if (tid == 0 && tile < n_tiles) s_item = find_item(tile_starts, n_items, tile);
    if (tid == NTHREADS - 1) s_nitem = chunk >= 0 ? chunk_group_item(tile_starts, n_items, chunk) : -1;
    __syncthreads();
    const bool norm = s_nitem >= 0;  /* this block normalises a group of chunks */
    if (tile < n_tiles) {
    const int item = s_item;
    if (tid < %(D_FIELDS)d) sd[tid] = desc[(long long)item * %(D_FIELDS)d + tid];
    __syncthreads();
    if (tid == NTHREADS - 1 && norm)
        chunk_prefetch(desc, tile_starts, s_nitem, chunk, item_max, done, nd, &s_nlo, &s_nready);

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
        /* span is a multiple of 4 and SIDX keeps 4 samples from 4 e on together (160 is),
           so aligned input is read 4 samples a load and stored 4 a store */
        if (sd[%(D_BODY_I16)d]) {
            const short* p = (const short*)sd[%(D_BODY)d] + (base - body0);
#if SPAD
            if (((unsigned long long)p & 7ull) == 0) {
                const short4* p4 = (const short4*)p;
                for (int e4 = tid; e4 < span / 4; e4 += NTHREADS) {
                    const short4 v = p4[e4];
                    *(float4*)(sm + SIDX(4 * e4)) = make_float4(
                        (float)v.x * 3.0517578125e-05f, (float)v.y * 3.0517578125e-05f,
                        (float)v.z * 3.0517578125e-05f, (float)v.w * 3.0517578125e-05f);
                }
            } else
#endif
            for (int e = tid; e < span; e += NTHREADS) sm[SIDX(e)] = (float)p[e] * 3.0517578125e-05f;
        } else {
            const float* p = (const float*)sd[%(D_BODY)d] + (base - body0);
#if SPAD
            if (((unsigned long long)p & 15ull) == 0) {
                const float4* p4 = (const float4*)p;
                for (int e4 = tid; e4 < span / 4; e4 += NTHREADS) {
                    const float4 v = p4[e4];
                    nonfinite |= !(isfinite(v.x) && isfinite(v.y) && isfinite(v.z) && isfinite(v.w));
                    *(float4*)(sm + SIDX(4 * e4)) = v;
                }
            } else
#endif
            for (int e = tid; e < span; e += NTHREADS) {
                const float v = p[e];
                nonfinite |= !isfinite(v);
                sm[SIDX(e)] = v;
            }
        }
    } else {
        for (int e = tid; e < span; e += NTHREADS) {
            const float v = fetch(sd, base + e);
            nonfinite |= !isfinite(v);
            sm[SIDX(e)] = v;
        }
    }
    if (__syncthreads_or(nonfinite) && tid == 0 && bad != nullptr)
        atomicOr(bad + sd[%(D_MAX_INDEX)d], 1u);

    const int f = tid / 20;
    const int r = tid - f * 20;   /* k1 in stage 2 */
    const bool act = f < nf;
    /* stage 1's thread (f1, n2 = r1): frame-minor where SPAD is set, so a warp's lanes
       are 8 frames x 4 rows: its sample loads (padded hop) and its stores of B (frame
       stride 20 mod 32, row stride 21) fall in 32 different banks */
#if SPAD
    const int f1 = tid %% FPB, r1 = tid / FPB;
#else
    const int f1 = f, r1 = r;
#endif
    const bool act1 = f1 < nf;
    float* sbr = sm;
    float* sbi = sm + FPB * BS;

    /* stage 1: thread (f1, n2) -> B[n2][k1], k1 = 0..19 */
    float xr[20];
    if (act1) {
%(window_load)s
    }
    __syncthreads();
    if (act1) {
        float ar[11], ai[11];
%(stage1)s
%(twiddle_init)s
#pragma unroll
        for (int k1 = 0; k1 < 20; ++k1) {
            const float a = k1 <= 10 ? ar[k1] : ar[20 - k1];
            const float b = k1 <= 10 ? ai[k1] : -ai[20 - k1];
            if (k1 == 0) {  /* twiddle 1 */
                sbr[f1 * BS + r1 * 21] = a;
                sbi[f1 * BS + r1 * 21] = b;
                continue;
            }
%(twiddle_load)s
            sbr[f1 * BS + r1 * 21 + k1] = fmaf(a, tw.x, -(b * tw.y));
            sbi[f1 * BS + r1 * 21 + k1] = fmaf(a, tw.y, b * tw.x);
        }
    }
    __syncthreads();

    /* stage 2: thread (f, k1) -> |X[k1 + 20 k2]|^2, k2 = 0..10 */
    float pw[11];
    if (act) {
%(stage2)s
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
    float* out = (float*)sd[%(D_OUT)d];
    const long long fs = sd[%(D_OUT_FS)d], ms = sd[%(D_OUT_MS)d];
    float lmax;
#if MEL_ILP
    float* stage = sm + FPB * BS;  /* mel-major: the tile's values, [m][ff] (B's im part is free) */
    lmax = n_mels == 128 ? mel_tile<128>(sp, tab128, w128, tid, nf, f0, out, fs, ms, stage)
                         : mel_tile<80>(sp, tab80, w80, tid, nf, f0, out, fs, ms, stage);
    if (ms != 1) {
        /* mel-major output: 8 neighbouring threads store the tile's 8 frames of a row */
        __syncthreads();
        for (int e = tid; e < FPB * n_mels; e += NTHREADS) {
            const int ff = e %% FPB, m = e / FPB;
            if (ff < nf) out[(long long)(f0 + ff) * fs + (long long)m * ms] = stage[e];
        }
    }
#else
    const int* tab = n_mels == 128 ? tab128 : tab80;
    const float* wts = n_mels == 128 ? w128 : w80;
    lmax = __int_as_float(0xff800000);  /* -inf */
    if (ms == 1) {
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
#endif
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, o));
    if ((tid & 31) == 0 && lmax > __int_as_float(0xff800000))
        atomicMax(item_max + sd[%(D_MAX_INDEX)d], ordered_bits(lmax));
    if (done == nullptr) return;
    if (lag > 0) {
        /* count the tile: the block's frames and max written, then (this thread's
           gpu-scope fence, cumulative over the barrier) visible, then counted */
        __syncthreads();
        if (tid == 0) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            atomicAdd(done + sd[%(D_MAX_INDEX)d], 1u);
        }
    } else {

    /* fused normalisation: the item's last block to finish (a per-item tile counter)
       normalises the whole item in place with its max, while other blocks compute;
       the same expression as shmmel_normalise_items, so the same bits */
    __syncthreads();  /* the block's frames and max are written ... */
    if (tid == 0) {
        /* ... and, by this thread's gpu-scope fence (cumulative over the barrier), visible
           before it is counted; the last block's fence orders its reads after all counts */
        const unsigned int tiles = (unsigned int)(tile_starts[item + 1] - tile_starts[item]);
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        const bool last = atomicAdd(done + sd[%(D_MAX_INDEX)d], 1u) == tiles - 1;
        if (last) asm volatile("fence.acq_rel.gpu;" ::: "memory");
        s_last = last;
    }
    __syncthreads();
    if (!s_last) return;
    const float lo = from_ordered_bits(atomicOr(item_max + sd[%(D_MAX_INDEX)d], 0u)) - 8.0f;
    float4* o4 = (float4*)sd[%(D_OUT)d];
    const int n4 = (int)(sd[%(D_N_FRAMES)d] * n_mels / 4);
    for (int i0 = 0; i0 < n4; i0 += NTHREADS * NORM_ILP) {
        float4 v[NORM_ILP];
#pragma unroll
        for (int u = 0; u < NORM_ILP; ++u) {
            const int i = i0 + u * NTHREADS + tid;
            if (i < n4) v[u] = __ldcg(o4 + i);  /* L2: other blocks wrote it */
        }
#pragma unroll
        for (int u = 0; u < NORM_ILP; ++u) {
            const int i = i0 + u * NTHREADS + tid;
            if (i < n4) {
                v[u].x = (fmaxf(v[u].x, lo) + 4.0f) / 4.0f;
                v[u].y = (fmaxf(v[u].y, lo) + 4.0f) / 4.0f;
                v[u].z = (fmaxf(v[u].z, lo) + 4.0f) / 4.0f;
                v[u].w = (fmaxf(v[u].w, lo) + 4.0f) / 4.0f;
                o4[i] = v[u];
            }
        }
    }
    return;
    }  /* lag == 0 */
    } else if (tid == NTHREADS - 1 && norm) {  /* chunk re-read: a register less over the tile */
        chunk_prefetch(desc, tile_starts, s_nitem, s_tile - lag, item_max, done, nd, &s_nlo, &s_nready);
    }
    if (!norm) return;

    /* spread normalisation of chunk b - lag (the same expression as
       shmmel_normalise_items, so the same bits) */
    if (tid == NTHREADS - 1 && !s_nready) {
        const unsigned int* count = done + nd[3];
        while (ld_acquire(count) < (unsigned int)nd[4]) __nanosleep(100);
        s_nlo = from_ordered_bits(ld_relaxed(item_max + nd[3])) - 8.0f;
    }
    __syncthreads();  /* the acquiring thread's view of the item is the block's */
    {
        const float lo = s_nlo;
        float4* o4 = (float4*)nd[0];
        const long long end = nd[2];
        for (long long i0 = nd[1] + tid; i0 < end; i0 += NTHREADS * NORM_G) {
            float4 v[NORM_G];
#pragma unroll
            for (int u = 0; u < NORM_G; ++u)
                if (i0 + u * NTHREADS < end) v[u] = __ldcg(o4 + i0 + u * NTHREADS);  /* L2: other blocks wrote it */
#pragma unroll
            for (int u = 0; u < NORM_G; ++u) {
                if (i0 + u * NTHREADS < end) {
                    v[u].x = (fmaxf(v[u].x, lo) + 4.0f) / 4.0f;
                    v[u].y = (fmaxf(v[u].y, lo) + 4.0f) / 4.0f;
                    v[u].z = (fmaxf(v[u].z, lo) + 4.0f) / 4.0f;
                    v[u].w = (fmaxf(v[u].w, lo) + 4.0f) / 4.0f;
                    o4[i0 + u * NTHREADS] = v[u];
                }
            }
        }
    }
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


DIRECT_STAGE1 = r"""
        float su[10], df[10];
#pragma unroll
        for (int n1 = 1; n1 < 10; ++n1) {
            su[n1] = xr[n1] + xr[20 - n1];
            df[n1] = xr[n1] - xr[20 - n1];
        }
#pragma unroll
        for (int k1 = 0; k1 <= 10; ++k1) {
            float re = xr[0] + ((k1 & 1) ? -xr[10] : xr[10]);
            float im = 0.0f;
#pragma unroll
            for (int n1 = 1; n1 < 10; ++n1) {
                const int j = (n1 * k1) % 20;
                re = fmaf(su[n1], C20[j], re);
                im = fmaf(-df[n1], S20[j], im);
            }
            ar[k1] = re;
            ai[k1] = im;
        }"""

DIRECT_STAGE2 = r"""
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
                const int j = (n2 * k2) % 20;
                re = fmaf(C20[j], sre[n2], re);
                re = fmaf(S20[j], dim[n2], re);
                im = fmaf(C20[j], sim[n2], im);
                im = fmaf(-S20[j], dre[n2], im);
            }
            pw[k2] = fmaf(re, re, im * im);
        }"""
