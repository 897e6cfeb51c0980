/*
 * afdserve._native: decode kernels for x86-64 CPUs with AVX2 + FMA (this file: the fp32 GEMMs,
 * decode attention in fp32 and bf16, and the Python module; gemm_bf16.c: the bf16 GEMMs).
 *
 * 1. GEMMs for few rows:   y[M, N] = x[M, K] @ W^T, W given as [N, K] (checkpoint layout) or
 *    [K, N] (transposed storage).
 *    A decode step multiplies 1-32 rows by every weight matrix once, so the time is the time to
 *    stream the weights from memory. General BLAS kernels pack panels of W for reuse that small M
 *    never gets, and reach a third to a half of the streaming rate at 2-8 rows. The two kernels
 *    here read every weight byte once, and keep the rows of x and the partial outputs in
 *    registers or the first cache levels:
 *    - [N, K] ("dot" form): a block of NR consecutive weight rows is multiplied with every group
 *      of up to 4 rows of x, NR x MR dot products in registers; the next block is prefetched
 *      while the first group runs, later groups find the block in L1.
 *    - [K, N] ("axpy" form): for a tile of the outputs (sized so y's tile stays in L1/L2), KB rows
 *      of W at a time are streamed along N, each as one long contiguous run, and accumulated
 *      into y.
 * 2. Decode attention over the paged KV cache (one new token per sequence), reading each
 *    sequence's keys and values where they lie instead of gathering them into a copy first;
 *    every key and value is read once for all query heads that share it (MFA: all of them).
 *    A bf16 cache is widened to fp32 a chunk of keys / values at a time (exact) and then takes
 *    the fp32 code; the output is rounded to bf16 once. On AVX512-BF16 CPUs bf16 queries take
 *    AVX-512 loops instead: scores by vdpbf16ps straight from the bf16 keys (exact products, fp32
 *    sums), values widened in registers into 16-head x 16-column zmm accumulators. An 8-bit (e4m3) cache is widened the
 *    same way, exactly, with its per-tensor scales folded into the queries and the outputs;
 *    its queries / outputs are fp32 or bf16.
 * 3. Threads: every entry point takes `nthreads` (torch's thread count, from the kernel policy)
 *    and splits its outputs over an OpenMP team: GEMM columns, attention sequences x KV heads
 *    (with fewer of those than threads, each one by the whole team: keys, softmax columns, then
 *    value columns split over the threads). Built with
 *    -fopenmp, the extension binds to the libgomp torch has loaded (same soname), so torch's ops
 *    and these kernels share one runtime and one pool of threads (setup.py, docs/kernels.md).
 *    Each output is computed by the same instructions in the same order on any split: results
 *    are bitwise independent of the thread count.
 *
 * Benchmarks (benchmarks/kernel_bench.py, `afdserve bench`) pick which rows and layouts come
 * here; the Python side (afdserve/model/kernels.py) checks shapes, strides, dtype and device
 * before calling. Summation order differs from BLAS / SDPA, so results equal them up to rounding
 * (tests/test_kernels.py, tests/test_model_math.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>

#include "afd_native.h"

#ifdef AFD_X86

/* ---- [N, K] layout: y[m, n] = dot(x[m, :], w[n, :]) ------------------------------------------ */

#define AFD_ID(v) (v)

/* dot_MR_NR and gemm_dot (afd_native.h): fp32 weights, fp32 outputs. */
AFD_DOT_GEMM(dot, float, float, _mm256_loadu_ps, AFD_ID, AFD_ID, 16)

/* ---- [K, N] layout: y[m, :] += x[m, k] * wt[k, :] -------------------------------------------- */

#define KB AFD_KB
#define Y_TILE_BYTES (64 * 1024)  /* the outputs' tile, all rows of x together */

/* axpy_1, axpy_2, axpy_rows (afd_native.h): fp32 weights. */
AFD_AXPY_KERNELS(axpy, float, _mm256_loadu_ps, AFD_ID)

/* y = x @ wt */
TGT static void gemm_axpy(const float *x, ptrdiff_t ldx, const float *wt, ptrdiff_t ldw, float *y,
                          ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    ptrdiff_t NT = Y_TILE_BYTES / (ptrdiff_t)sizeof(float) / M;
    if (NT < 256) NT = 256;
    NT &= ~(ptrdiff_t)7;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += NT) {
        ptrdiff_t nt = N - n0 < NT ? N - n0 : NT;
        ptrdiff_t k0 = 0;
        for (; k0 + KB <= K; k0 += KB)
            for (ptrdiff_t m = 0; m < M;) {
                const float *xm = x + m * ldx + k0, *wk = wt + k0 * ldw + n0;
                float *ym = y + m * ldy + n0;
                if (M - m >= 2) {
                    axpy_2(xm, ldx, wk, ldw, ym, ldy, nt, k0 == 0);
                    m += 2;
                } else {
                    axpy_1(xm, ldx, wk, ldw, ym, ldy, nt, k0 == 0);
                    m += 1;
                }
            }
        if (k0 < K)
            axpy_rows(x + k0, ldx, wt + k0 * ldw + n0, ldw, y + n0, ldy, M, nt, K - k0, k0 == 0);
    }
}


/* ---- decode attention over the paged KV cache -------------------------------------------------- */

#ifndef PF_KEYS
#define PF_KEYS 16                       /* keys ahead that key_scores prefetches */
#endif

/* Scores of 4 (or 1) keys against every head at once: st[t, 0:HP] = k[t, :] . qt[:, 0:HP] for the
   nt keys k[t] (row stride ldk); qt is the group's queries transposed, [d, HP], HP % 8 == 0. Each
   key element is broadcast and multiplied into a whole row of heads, so no horizontal sums. */
TGT static void key_scores(const float *k, ptrdiff_t ldk, ptrdiff_t nt, const float *qt, ptrdiff_t HP,
                           ptrdiff_t d, float *st)
{
    ptrdiff_t t = 0;
    for (; t + 4 <= nt; t += 4) {
        const float *k0 = k + t * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        ptrdiff_t h = 0;
        for (; h + 16 <= HP; h += 16) {
            __m256 a[4][2];
            for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
            for (ptrdiff_t i = 0; i < d; i++) {
                if (h == 0 && (i & 15) == 0 && t + PF_KEYS + 4 <= nt) {   /* keys PF_KEYS ahead, while computing */
                    __builtin_prefetch(k0 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k1 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k2 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k3 + PF_KEYS * ldk + i, 0, 3);
                }
                __m256 q0 = _mm256_loadu_ps(qt + i * HP + h), q1 = _mm256_loadu_ps(qt + i * HP + h + 8);
                __m256 b0 = _mm256_broadcast_ss(k0 + i), b1 = _mm256_broadcast_ss(k1 + i);
                __m256 b2 = _mm256_broadcast_ss(k2 + i), b3 = _mm256_broadcast_ss(k3 + i);
                a[0][0] = _mm256_fmadd_ps(q0, b0, a[0][0]); a[0][1] = _mm256_fmadd_ps(q1, b0, a[0][1]);
                a[1][0] = _mm256_fmadd_ps(q0, b1, a[1][0]); a[1][1] = _mm256_fmadd_ps(q1, b1, a[1][1]);
                a[2][0] = _mm256_fmadd_ps(q0, b2, a[2][0]); a[2][1] = _mm256_fmadd_ps(q1, b2, a[2][1]);
                a[3][0] = _mm256_fmadd_ps(q0, b3, a[3][0]); a[3][1] = _mm256_fmadd_ps(q1, b3, a[3][1]);
            }
            for (int j = 0; j < 4; j++) {
                _mm256_storeu_ps(st + (t + j) * HP + h, a[j][0]);
                _mm256_storeu_ps(st + (t + j) * HP + h + 8, a[j][1]);
            }
        }
        for (; h < HP; h += 8) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (ptrdiff_t i = 0; i < d; i++) {
                if (h == 0 && (i & 15) == 0 && t + PF_KEYS + 4 <= nt) {
                    __builtin_prefetch(k0 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k1 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k2 + PF_KEYS * ldk + i, 0, 3);
                    __builtin_prefetch(k3 + PF_KEYS * ldk + i, 0, 3);
                }
                __m256 q0 = _mm256_loadu_ps(qt + i * HP + h);
                a0 = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(k0 + i), a0);
                a1 = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(k1 + i), a1);
                a2 = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(k2 + i), a2);
                a3 = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(k3 + i), a3);
            }
            _mm256_storeu_ps(st + t * HP + h, a0);
            _mm256_storeu_ps(st + (t + 1) * HP + h, a1);
            _mm256_storeu_ps(st + (t + 2) * HP + h, a2);
            _mm256_storeu_ps(st + (t + 3) * HP + h, a3);
        }
    }
    for (; t < nt; t++)
        for (ptrdiff_t h = 0; h < HP; h += 8) {
            __m256 a0 = _mm256_setzero_ps();
            for (ptrdiff_t i = 0; i < d; i++)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + i * HP + h), _mm256_broadcast_ss(k + t * ldk + i), a0);
            _mm256_storeu_ps(st + t * HP + h, a0);
        }
}

/* o[0:hpg, 0:d] (= when `first`, else +=) sum over t < nt of p[t, h] * v[t, :]; p is [nt, HP]
   (row stride HP), v rows have stride ldv, o rows ldo. Blocks of 4 heads x 16 columns in registers. The
   first block prefetches the `next` rows of values (the following chunk), one line per row and
   16 columns. */
TGT static void weighted_values(const float *p, ptrdiff_t HP, ptrdiff_t hpg, const float *v, ptrdiff_t ldv,
                                ptrdiff_t nt, ptrdiff_t d, float *o, ptrdiff_t ldo, int first, ptrdiff_t next)
{
    ptrdiff_t h = 0;
    for (; h + 4 <= hpg; h += 4) {
        ptrdiff_t c = 0;
        for (; c + 16 <= d; c += 16) {
            __m256 a[4][2];
            for (int j = 0; j < 4; j++)
                for (int u = 0; u < 2; u++)
                    a[j][u] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + (h + j) * ldo + c + 8 * u);
            for (ptrdiff_t t = 0; t < nt; t++) {
                if (h == 0 && t < next) __builtin_prefetch(v + (nt + t) * ldv + c, 0, 3);
                __m256 v0 = _mm256_loadu_ps(v + t * ldv + c), v1 = _mm256_loadu_ps(v + t * ldv + c + 8);
                for (int j = 0; j < 4; j++) {
                    __m256 b = _mm256_broadcast_ss(p + t * HP + h + j);
                    a[j][0] = _mm256_fmadd_ps(v0, b, a[j][0]);
                    a[j][1] = _mm256_fmadd_ps(v1, b, a[j][1]);
                }
            }
            for (int j = 0; j < 4; j++)
                for (int u = 0; u < 2; u++) _mm256_storeu_ps(o + (h + j) * ldo + c + 8 * u, a[j][u]);
        }
        for (; c < d; c++)
            for (int j = 0; j < 4; j++) {
                float acc = first ? 0.f : o[(h + j) * ldo + c];
                for (ptrdiff_t t = 0; t < nt; t++) acc += p[t * HP + h + j] * v[t * ldv + c];
                o[(h + j) * ldo + c] = acc;
            }
    }
    for (; h < hpg; h++)
        for (ptrdiff_t c = 0; c < d; c++) {
            float acc = first ? 0.f : o[h * ldo + c];
            for (ptrdiff_t t = 0; t < nt; t++) acc += p[t * HP + h] * v[t * ldv + c];
            o[h * ldo + c] = acc;
        }
}

/* Softmax down columns [h0, h1) (multiples of 8) of st [n, HP] in place (exp(x - column max));
   inv[h] = 1 / column sum. */
TGT static void column_softmax(float *st, ptrdiff_t n, ptrdiff_t HP, float *inv, ptrdiff_t h0, ptrdiff_t h1)
{
    for (ptrdiff_t h = h0; h < h1; h += 8) {
        __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (ptrdiff_t t = 0; t < n; t++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(st + t * HP + h));
        for (ptrdiff_t t = 0; t < n; t++) {
            __m256 e = afd_exp_ps(_mm256_sub_ps(_mm256_loadu_ps(st + t * HP + h), mx));   /* <= 0 */
            _mm256_storeu_ps(st + t * HP + h, e);
            sum = _mm256_add_ps(sum, e);
        }
        _mm256_storeu_ps(inv + h, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
    }
}

#define VALUE_CHUNK_BYTES (16 * 1024)   /* values of this many bytes are used from L1 by every head block */
#define KEY_CHUNK 64                    /* bf16 keys widened to fp32 at a time */

enum { KV_AS_Q = 0, KV_E4M3 = 1 };     /* the cache's format: q's dtype, or 8-bit e4m3 */

/* What every (sequence, KV head, head range) item of one decode attention call shares. */
typedef struct {
    const void *q, *k, *v;   /* q, out: fp32 or bf16 (`bf16`); k, v: the same, or e4m3 bytes (`kv`) */
    void *out;
    ptrdiff_t nq, d, g, bs, max_blocks, max_ctx;
    const int64_t *tables, *lens;
    float scale, v_scale;    /* e4m3: scale includes the keys' scale, v_scale the values' (x 2^8 each) */
    int bf16, kv;
    int dp;                  /* bf16 q, AVX512-BF16: scores by vdpbf16ps, values in zmm (below; e4m3 widened to bf16) */
} attn_args;

/* Query heads of one KV head, padded: to 16 for the AVX-512 path (a zmm of heads), else to 8. */
static ptrdiff_t padded_heads(const attn_args *a)
{
    const ptrdiff_t nh = a->nq / a->g;
    return a->dp ? (nh + 15) / 16 * 16 : (nh + 7) / 8 * 8;
}

#define TGT_DP __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

/* st[t, 0:HP] = scale x (k[t, :] . q[h, :]) for nt bf16 keys k[t] (row stride ldk) and the queries
   packed as bf16 pairs qp[p, h] = (q[h, 2p], q[h, 2p + 1]) (d even, HP % 16 == 0): one vdpbf16ps
   multiplies a pair of one key's elements, broadcast, into 16 heads, exact products summed in
   fp32. Four keys at a time, each in its own accumulators (the same instructions per key wherever
   it falls). No widening of the keys: they are read as stored. */
TGT_DP static void key_scores_dp(const uint16_t *k, ptrdiff_t ldk, ptrdiff_t nt, const uint32_t *qp, ptrdiff_t HP,
                                 ptrdiff_t d, float scale, float *st)
{
    const __m512 sc = _mm512_set1_ps(scale);
    const ptrdiff_t pairs = d / 2;
    ptrdiff_t t = 0;
    for (; t + 4 <= nt; t += 4) {
        const uint16_t *k0 = k + t * ldk;
        if (t + PF_KEYS + 4 <= nt)
            for (int j = 0; j < 4; j++)
                for (ptrdiff_t i = 0; i < d; i += 32) _mm_prefetch((const char *)(k0 + (PF_KEYS + j) * ldk + i), _MM_HINT_T0);
        for (ptrdiff_t h = 0; h < HP; h += 16) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (ptrdiff_t p = 0; p < pairs; p++) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + p * HP + h);
                uint32_t w0, w1, w2, w3;
                memcpy(&w0, k0 + 2 * p, 4);
                memcpy(&w1, k0 + ldk + 2 * p, 4);
                memcpy(&w2, k0 + 2 * ldk + 2 * p, 4);
                memcpy(&w3, k0 + 3 * ldk + 2 * p, 4);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)w0), qv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)w1), qv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32((int)w2), qv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32((int)w3), qv);
            }
            _mm512_storeu_ps(st + t * HP + h, _mm512_mul_ps(a0, sc));
            _mm512_storeu_ps(st + (t + 1) * HP + h, _mm512_mul_ps(a1, sc));
            _mm512_storeu_ps(st + (t + 2) * HP + h, _mm512_mul_ps(a2, sc));
            _mm512_storeu_ps(st + (t + 3) * HP + h, _mm512_mul_ps(a3, sc));
        }
    }
    for (; t < nt; t++)
        for (ptrdiff_t h = 0; h < HP; h += 16) {
            __m512 a0 = _mm512_setzero_ps();
            for (ptrdiff_t p = 0; p < pairs; p++) {
                uint32_t w0;
                memcpy(&w0, k + t * ldk + 2 * p, 4);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)w0), (__m512bh)_mm512_loadu_si512(qp + p * HP + h));
            }
            _mm512_storeu_ps(st + t * HP + h, _mm512_mul_ps(a0, sc));
        }
}

/* o[0:HP, 0:nc] (row stride ldo; = when `first`, else +=) sum over t < nt of p[t, h] * v[t, :] for
   bf16 values v (row stride ldv), widened in registers: 16 heads x 16 columns of accumulators in
   zmm, each (head, column) summed over t in order by FMA, as weighted_values does (the same
   bits); the last columns masked. */
TGT_DP static void values_dp(const float *p, ptrdiff_t HP, const uint16_t *v, ptrdiff_t ldv, ptrdiff_t nt,
                             ptrdiff_t nc, float *o, ptrdiff_t ldo, int first)
{
    for (ptrdiff_t h0 = 0; h0 < HP; h0 += 16)
        for (ptrdiff_t c = 0; c < nc; c += 16) {
            const __mmask16 m = nc - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nc - c)) - 1u);
            __m512 acc[16];
            for (int j = 0; j < 16; j++)
                acc[j] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, o + (h0 + j) * ldo + c);
            for (ptrdiff_t t = 0; t < nt; t++) {
                const __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v + t * ldv + c)), 16));
                const float *pt = p + t * HP + h0;
                for (int j = 0; j < 16; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(pt[j]), vv, acc[j]);
            }
            for (int j = 0; j < 16; j++) _mm512_mask_storeu_ps(o + (h0 + j) * ldo + c, m, acc[j]);
        }
}

/* dst[t, 0:d] = fp32 of the bf16 rows src[t * ld, 0:d] for t < n (exact). */
TGT static void widen_rows(const uint16_t *src, ptrdiff_t ld, ptrdiff_t n, ptrdiff_t d, float *dst)
{
    for (ptrdiff_t t = 0; t < n; t++) {
        ptrdiff_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + t * d + i, afd_bf16x8_to_ps(src + t * ld + i));
        for (; i < d; i++) dst[t * d + i] = afd_bf16_to_f32(src[t * ld + i]);
    }
}

/* e4m3 codes -> fp32 x 2^-8, exact (subnormals included): the code's sign moved to bit 15 and its
   7 exponent + mantissa bits shifted up by 7 make the fp16 number of the same value x 2^-8 (the
   exponent biases differ by 8), which F16C widens; the NaN codes (0x7f, 0xff) get fp16's exponent
   of all ones, so a NaN written into the cache reads back as NaN. Compiled with -DKV_E4M3_LUT
   instead: a 256-entry fp32 table (the same values) read by an AVX2 gather; the bit form measured
   faster (docs/fp8.md). */
#ifdef KV_E4M3_LUT
static float e4m3_table[256];
static void e4m3_table_init(void)
{
    for (int c = 0; c < 256; c++) {
        int e = (c >> 3) & 15, m = c & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        e4m3_table[c] = (c & 0x7f) == 0x7f ? NAN : (c & 0x80 ? -v : v) / 256.0f;   /* as the bit form */
    }
}
#define TGT_E4M3 TGT
TGT_E4M3 static inline __m256 e4m3x8_to_ps(const uint8_t *p)
{
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_i32gather_ps(e4m3_table, c, 4);
}
#else
#define TGT_E4M3 __attribute__((target("avx2,fma,f16c")))
TGT_E4M3 static inline __m256 e4m3x8_to_ps(const uint8_t *p)
{
    __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i m = _mm_and_si128(c, _mm_set1_epi16(0x7f));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(m, 7));
    h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(m, _mm_set1_epi16(0x7f)), _mm_set1_epi16(0x7c00)));
    return _mm256_cvtph_ps(h);
}
#endif

static float e4m3_to_f32_scaled(uint8_t c)      /* the scalar tail: the same value x 2^-8 */
{
    int e = (c >> 3) & 15, m = c & 7;
    if ((c & 0x7f) == 0x7f) return NAN;
    float v = e ? ldexpf(1.0f + m / 8.0f, e - 15) : ldexpf(m / 8.0f, -14);
    return c & 0x80 ? -v : v;
}

/* dst[t, 0:d] = the e4m3 rows src[t * ld, 0:d] x 2^-8 in fp32 for t < n (exact). */
TGT_E4M3 static void widen_rows_e4m3(const uint8_t *src, ptrdiff_t ld, ptrdiff_t n, ptrdiff_t d, float *dst)
{
    for (ptrdiff_t t = 0; t < n; t++) {
        ptrdiff_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(dst + t * d + i, e4m3x8_to_ps(src + t * ld + i));
        for (; i < d; i++) dst[t * d + i] = e4m3_to_f32_scaled(src[t * ld + i]);
    }
}

/* dst[t, 0:d] = the e4m3 rows src[t * ld, 0:d] x 2^-8 as bf16, for the AVX-512 path; exact (e4m3
   has 3 mantissa bits), 32 codes at a time by integer arithmetic: a normal code's exponent and
   mantissa bits, shifted up by 4, plus the exponent bias difference (127 - 7 - 8) << 7 are the bf16
   bits; the 7 subnormal codes come from a table; the NaN codes (0x7f, 0xff) give a quiet NaN. */
static const uint16_t E4M3_SUBNORMAL_BF16[32] = {0, 0x3700, 0x3780, 0x37c0, 0x3800, 0x3820, 0x3840, 0x3860};

TGT_DP static void widen_rows_e4m3_bf16(const uint8_t *src, ptrdiff_t ld, ptrdiff_t n, ptrdiff_t d, uint16_t *dst)
{
    const __m512i sub = _mm512_loadu_si512(E4M3_SUBNORMAL_BF16);
    for (ptrdiff_t t = 0; t < n; t++) {
        ptrdiff_t i = 0;
        for (; i + 32 <= d; i += 32) {
            const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + t * ld + i)));
            const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi16(0x7f));
            __m512i b = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(0x3800));
            b = _mm512_mask_permutexvar_epi16(b, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, sub);
            b = _mm512_mask_mov_epi16(b, _mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x7f)), _mm512_set1_epi16(0x7fc0));
            b = _mm512_or_si512(b, _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x80)), 8));
            _mm512_storeu_si512(dst + t * d + i, b);
        }
        for (; i < d; i++) dst[t * d + i] = afd_f32_to_bf16(e4m3_to_f32_scaled(src[t * ld + i]));
    }
}

/* Columns [col, col + nc) of rows [c0, c0 + n) of a run of cache rows starting at element `base`
   (row stride ld) of k or v, widened to fp32 into conv (row stride nc). */
TGT static void widen_chunk(const attn_args *a, const void *kv, ptrdiff_t base, ptrdiff_t c0, ptrdiff_t n,
                            ptrdiff_t col, ptrdiff_t nc, float *conv)
{
    const ptrdiff_t ld = a->g * a->d;
    if (a->kv == KV_E4M3)
        widen_rows_e4m3((const uint8_t *)kv + base + c0 * ld + col, ld, n, nc, conv);
    else
        widen_rows((const uint16_t *)kv + base + c0 * ld + col, ld, n, nc, conv);
}

/* The cache is read as fp32 where it lies; else widened a chunk at a time into the workspace. */
static int kv_widened(const attn_args *a)
{
    return a->kv == KV_E4M3 || (a->bf16 && !a->dp);
}

static ptrdiff_t value_chunk(ptrdiff_t d)
{
    ptrdiff_t chunk = VALUE_CHUNK_BYTES / (ptrdiff_t)sizeof(float) / d;
    return chunk < 4 ? 4 : chunk;
}

/* Floats of the fp32 widening buffer (keys or values, a chunk at a time). */
static size_t conv_floats(const attn_args *a)
{
    size_t rows = (size_t)(value_chunk(a->d) > KEY_CHUNK ? value_chunk(a->d) : KEY_CHUNK);
    return kv_widened(a) ? rows * (size_t)a->d : 0;
}

/* Floats of what a thread keeps for itself: the transposed queries qt [d, HP], the widening buffer
   and (bf16 output) the fp32 outputs os [heads, d] of one KV head's query heads. */
static size_t attn_private_floats(const attn_args *a)
{
    const size_t HP = (size_t)padded_heads(a), d = (size_t)a->d;
    return d * HP + conv_floats(a) + (a->bf16 ? HP * d : 0);
}

/* Floats of the scores st [max_ctx, HP] and their column sums' inverses inv [HP]. */
static size_t attn_scores_floats(const attn_args *a)
{
    return ((size_t)a->max_ctx + 1) * (size_t)padded_heads(a);
}

/* End (exclusive) of the run of blocks from b whose ids follow each other: contiguous slots. */
static ptrdiff_t run_end(const int64_t *table, ptrdiff_t b, ptrdiff_t nb)
{
    ptrdiff_t e = b + 1;
    while (e < nb && table[e] == table[e - 1] + 1) e++;
    return e;
}

/* Prefetch (into L2) columns [col, col + nc) of sequence s's cached rows of KV head gi for tokens
   [t0, t1) of k or v, through the block table. The blocks of a sequence lie anywhere in the cache
   and each starts a new stream the hardware prefetchers pick up late: each chunk of keys or values
   asks for the next one while it is computed (a decode step has evicted every cache from L2/L3
   by streaming the weights, so without this every block's first lines stall). */
static void prefetch_tokens(const attn_args *a, const void *kv, ptrdiff_t s, ptrdiff_t gi, ptrdiff_t t0,
                            ptrdiff_t t1, ptrdiff_t col, ptrdiff_t nc)
{
    const ptrdiff_t bs = a->bs;
    const size_t elem = a->kv == KV_E4M3 ? 1 : (a->bf16 ? 2 : 4);
    const int64_t *table = a->tables + s * a->max_blocks;
    for (ptrdiff_t t = t0; t < t1; t++) {
        const uintptr_t start = (uintptr_t)kv + (size_t)(((table[t / bs] * bs + t % bs) * a->g + gi) * a->d + col) * elem;
        for (uintptr_t line = start & ~(uintptr_t)63; line < start + (size_t)nc * elem; line += 64)
            _mm_prefetch((const char *)line, _MM_HINT_T1);
    }
}

/* Scores st[t0:t1, 0:HP] of sequence s's keys t0..t1-1 of KV head gi against the queries qt
   [d, HP]. Each key's scores are computed alone (the same instructions wherever the range starts). */
TGT static void item_scores(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, const float *qt, ptrdiff_t HP,
                            float *st, float *conv, ptrdiff_t t0, ptrdiff_t t1)
{
    const ptrdiff_t d = a->d, ld = a->g * d, bs = a->bs, nb = (t1 + bs - 1) / bs;
    const int64_t *table = a->tables + s * a->max_blocks;
    for (ptrdiff_t b = t0 / bs; b < nb;) {
        ptrdiff_t e = run_end(table, b, nb), r0 = b * bs > t0 ? b * bs : t0;
        ptrdiff_t nt = (e * bs < t1 ? e * bs : t1) - r0;
        ptrdiff_t base = (table[b] * bs * a->g + gi) * d + (r0 - b * bs) * ld;
        if (!a->dp && !kv_widened(a)) {                             /* fp32, read in place */
            const ptrdiff_t next = r0 + nt;                         /* the next run's first keys */
            prefetch_tokens(a, a->k, s, gi, next, next + PF_KEYS < t1 ? next + PF_KEYS : t1, 0, d);
            key_scores((const float *)a->k + base, ld, nt, qt, HP, d, st + r0 * HP);
        } else
            for (ptrdiff_t c0 = 0; c0 < nt; c0 += KEY_CHUNK) {
                ptrdiff_t n = nt - c0 < KEY_CHUNK ? nt - c0 : KEY_CHUNK, next = r0 + c0 + n;
                float *sc = st + (r0 + c0) * HP;
                prefetch_tokens(a, a->k, s, gi, next, next + KEY_CHUNK < t1 ? next + KEY_CHUNK : t1, 0, d);
                if (!a->dp) {                                       /* widened to fp32 */
                    widen_chunk(a, a->k, base, c0, n, 0, d, conv);
                    key_scores(conv, d, n, qt, HP, d, sc);
                } else if (a->kv == KV_E4M3) {                      /* widened to bf16 (exact) */
                    widen_rows_e4m3_bf16((const uint8_t *)a->k + base + c0 * ld, ld, n, d, (uint16_t *)conv);
                    key_scores_dp((const uint16_t *)conv, d, n, (const uint32_t *)qt, HP, d, a->scale, sc);
                } else {                                            /* bf16, read in place */
                    key_scores_dp((const uint16_t *)a->k + base + c0 * ld, ld, n, (const uint32_t *)qt, HP, d,
                                  a->scale, sc);
                }
            }
        b = e;
    }
}

/* os[0:nh, v0:v1] (row stride d) = sum over the context of p[t, h] * v[t, v0:v1] (p = softmaxed
   st, unnormalised). Each column sums over the context in the same order wherever v0 lies (v0: a
   multiple of 16, so the same vector / tail code runs per column). */
TGT static void item_values(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, const float *st, ptrdiff_t HP,
                            ptrdiff_t nh, float *os, float *conv, ptrdiff_t v0, ptrdiff_t v1)
{
    const ptrdiff_t d = a->d, ld = a->g * d, bs = a->bs, ctx = a->lens[s], nb = (ctx + bs - 1) / bs;
    const ptrdiff_t chunk = value_chunk(d), nc = v1 - v0;
    const int64_t *table = a->tables + s * a->max_blocks;
    for (ptrdiff_t b = 0; b < nb;) {
        ptrdiff_t e = run_end(table, b, nb), t0 = b * bs, nt = (e * bs < ctx ? e * bs : ctx) - t0;
        ptrdiff_t base = (table[b] * bs * a->g + gi) * d;
        for (ptrdiff_t c0 = 0; c0 < nt; c0 += chunk) {
            ptrdiff_t n = nt - c0 < chunk ? nt - c0 : chunk, rest = nt - c0 - n, next = t0 + c0 + n;
            const float *p = st + (t0 + c0) * HP;
            if (kv_widened(a) || a->dp || rest == 0)      /* (fp32 in a run: weighted_values prefetches) */
                prefetch_tokens(a, a->v, s, gi, next, next + chunk < ctx ? next + chunk : ctx, v0, nc);
            if (a->dp && a->kv == KV_E4M3) {
                widen_rows_e4m3_bf16((const uint8_t *)a->v + base + c0 * ld + v0, ld, n, nc, (uint16_t *)conv);
                values_dp(p, HP, (const uint16_t *)conv, nc, n, nc, os + v0, d, t0 + c0 == 0);
            } else if (a->dp) {
                values_dp(p, HP, (const uint16_t *)a->v + base + c0 * ld + v0, ld, n, nc, os + v0, d, t0 + c0 == 0);
            } else if (!kv_widened(a)) {
                weighted_values(p, HP, nh, (const float *)a->v + base + c0 * ld + v0, ld, n, nc, os + v0, d,
                                t0 + c0 == 0, rest < n ? rest : n);
            } else {
                widen_chunk(a, a->v, base, c0, n, v0, nc, conv);
                weighted_values(p, HP, nh, conv, nc, n, nc, os + v0, d, t0 + c0 == 0, 0);
            }
        }
        b = e;
    }
}

/* The queries of KV head gi's nh query heads (at qoff), scaled and transposed to qt [d, HP]
   (HP = padded_heads, the padding heads zero); for the AVX-512 path packed as bf16 pairs instead. */
TGT static void transpose_queries(const attn_args *a, ptrdiff_t qoff, ptrdiff_t nh, ptrdiff_t HP, float *qt)
{
    const ptrdiff_t d = a->d;
    if (a->dp) {                     /* bf16 pairs qp [d / 2, HP] (key_scores_dp), in qt's room */
        const uint16_t *q = (const uint16_t *)a->q + qoff;
        uint32_t *qp = (uint32_t *)qt;
        for (ptrdiff_t p = 0; p < d / 2; p++)
            for (ptrdiff_t h = 0; h < HP; h++)
                qp[p * HP + h] = h < nh ? (uint32_t)q[h * d + 2 * p] | (uint32_t)q[h * d + 2 * p + 1] << 16 : 0u;
        return;
    }
    for (ptrdiff_t i = 0; i < d; i++) {
        for (ptrdiff_t h = 0; h < nh; h++)
            qt[i * HP + h] = (a->bf16 ? afd_bf16_to_f32(((const uint16_t *)a->q)[qoff + h * d + i])
                                      : ((const float *)a->q)[qoff + h * d + i]) * a->scale;
        for (ptrdiff_t h = nh; h < HP; h++) qt[i * HP + h] = 0.f;
    }
}

/* Columns [v0, v1) of the nh heads' outputs (at qoff): os x inv x v_scale, rounded once for bf16
   (fp32: os is the output itself, scaled in place). */
static void finish_output(const attn_args *a, ptrdiff_t qoff, ptrdiff_t nh, float *os, const float *inv,
                          ptrdiff_t v0, ptrdiff_t v1)
{
    const ptrdiff_t d = a->d;
    for (ptrdiff_t h = 0; h < nh; h++)
        for (ptrdiff_t i = v0; i < v1; i++) {
            float o = os[h * d + i] * inv[h] * a->v_scale;
            if (a->bf16)
                ((uint16_t *)a->out)[qoff + h * d + i] = afd_f32_to_bf16(o);
            else
                os[h * d + i] = o;
        }
}

/* One KV head gi of sequence s (one new token) as a thread sees it: its query heads, their padded
   count HP, the context, where their queries / outputs start, and the thread's own buffers in
   `priv` (attn_private_floats: the transposed queries qt [d, HP], the widening buffer conv, and
   for a bf16 output the fp32 outputs os; a NULL priv gives NULL buffers). */
typedef struct {
    ptrdiff_t nh, HP, ctx, qoff;
    float *qt, *conv, *os;
} item_view;

static item_view item_at(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, float *priv)
{
    item_view v;
    v.nh = a->nq / a->g;
    v.HP = padded_heads(a);
    v.ctx = a->lens[s];
    v.qoff = (s * a->nq + gi * v.nh) * a->d;
    v.qt = priv;
    v.conv = priv ? priv + a->d * v.HP : NULL;
    v.os = a->bf16 ? (priv ? v.conv + conv_floats(a) : NULL) : (float *)a->out + v.qoff;
    return v;
}

/* Scores st[t0:t1] of the item's keys; their first chunk is fetched while the queries are
   transposed. */
TGT static void item_scores_phase(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, const item_view *v, float *st,
                                  ptrdiff_t t0, ptrdiff_t t1)
{
    prefetch_tokens(a, a->k, s, gi, t0, t1 - t0 < KEY_CHUNK ? t1 : t0 + KEY_CHUNK, 0, a->d);
    transpose_queries(a, v->qoff, v->nh, v->HP, v->qt);
    item_scores(a, s, gi, v->qt, v->HP, st, v->conv, t0, t1);
}

/* The first chunk of value columns [v0, v1), asked for before the softmax runs. */
static void prefetch_first_values(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, const item_view *v, ptrdiff_t v0,
                                  ptrdiff_t v1)
{
    prefetch_tokens(a, a->v, s, gi, 0, v->ctx < value_chunk(a->d) ? v->ctx : value_chunk(a->d), v0, v1 - v0);
}

/* Output columns [v0, v1) from the softmaxed scores st and their inverse sums inv. */
TGT static void item_values_phase(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, const item_view *v,
                                  const float *st, const float *inv, ptrdiff_t v0, ptrdiff_t v1)
{
    item_values(a, s, gi, st, v->HP, v->nh, v->os, v->conv, v0, v1);
    finish_output(a, v->qoff, v->nh, v->os, inv, v0, v1);
}

/* One thread's KV head gi of sequence s (one new token): all its query heads attend together.
   Their queries meet every key once (scores laid out [ctx, HP]), the softmax runs down the
   columns, and the values are read once per chunk for all heads. On the AVX2 path the queries are
   scaled and transposed to [d, HP], bf16 keys and values are widened to fp32 a chunk at a time
   (exact) and everything after that is the fp32 code; on the AVX-512 path (`dp`) scores come
   from vdpbf16ps over the bf16 keys and values are widened in registers. The output is rounded
   once. e4m3 keys and values are widened the same way (to their value x 2^-8: the queries' scale
   carries the keys' scale x 2^8, v_scale the values'). `work`: attn_scores_floats +
   attn_private_floats floats (st | inv | the thread's own buffers). */
TGT static void attend_item(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, float *work)
{
    const ptrdiff_t HP = padded_heads(a);
    float *st = work, *inv = st + a->max_ctx * HP;
    const item_view v = item_at(a, s, gi, inv + HP);
    item_scores_phase(a, s, gi, &v, st, 0, v.ctx);
    prefetch_first_values(a, s, gi, &v, 0, a->d);
    column_softmax(st, v.ctx, HP, inv, 0, HP);
    item_values_phase(a, s, gi, &v, st, inv, 0, a->d);
}

#ifdef _OPENMP
/* The same for thread `tid` of a team of nt, which together attend KV head gi of sequence s: the
   keys are split over the threads (scores), then the heads' columns of st (softmax), then the
   columns of the values (weighted sums; boundaries on multiples of 16). Every score, softmax
   column and output column runs the instructions attend_item runs for it, in the same order, so
   the result is bitwise that of one thread. st / inv: shared by the team; priv: this thread's
   attn_private_floats (NULL: its allocation failed, the call fails, the barriers are still met). */
TGT static void team_item(const attn_args *a, ptrdiff_t s, ptrdiff_t gi, float *st, float *inv, float *priv,
                          int tid, int nt)
{
    const item_view v = item_at(a, s, gi, priv);
    ptrdiff_t t0, t1, h0, h1, v0, v1;
    afd_split(v.ctx, nt, tid, 4, &t0, &t1);
    afd_split(v.HP, nt, tid, 8, &h0, &h1);
    afd_split(a->d, nt, tid, 16, &v0, &v1);
    if (priv && t0 < t1) item_scores_phase(a, s, gi, &v, st, t0, t1);
    if (v0 < v1) prefetch_first_values(a, s, gi, &v, v0, v1);
#pragma omp barrier
    if (h0 < h1) column_softmax(st, v.ctx, v.HP, inv, h0, h1);
#pragma omp barrier
    if (priv && v0 < v1) item_values_phase(a, s, gi, &v, st, inv, v0, v1);
#pragma omp barrier                                    /* st and inv are the next item's */
}

/* Fewer sequence x KV head items than threads (batch 1: one): each item in turn by the whole team. */
static int attend_team(const attn_args *a, ptrdiff_t items, int nthreads)
{
    float *st = malloc(sizeof(float) * attn_scores_floats(a));
    if (!st) return -1;
    float *inv = st + a->max_ctx * padded_heads(a);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float *priv = malloc(sizeof(float) * attn_private_floats(a));
        failed |= priv == NULL;
        for (ptrdiff_t it = 0; it < items; it++) team_item(a, it / a->g, it % a->g, st, inv, priv, tid, nt);
        free(priv);
    }
    free(st);
    return failed ? -1 : 0;
}
#endif

/* Every sequence x KV head over `nthreads` OpenMP threads: one item per thread at a time, or, with
   fewer items than threads, each item by the whole team (attend_team). Results are bitwise those
   of one thread. Returns 0, or -1 when a workspace could not be allocated. */
static int attend(const attn_args *a, ptrdiff_t S, ptrdiff_t total_ctx, int nthreads)
{
    const ptrdiff_t items = S * a->g;
    int nt = afd_threads_for(total_ctx * a->g * a->d * 2, nthreads);
#ifdef _OPENMP
    if (nt > 1 && items < nt) return attend_team(a, items, nt);
#endif
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed) if (nt > 1)
    {
        float *work = malloc(sizeof(float) * (attn_scores_floats(a) + attn_private_floats(a)));
        failed |= work == NULL;
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t it = 0; it < items; it++)
            if (work) attend_item(a, it / a->g, it % a->g, work);
        free(work);
    }
    return failed ? -1 : 0;
}
#endif

static int cpu_ok(void)
{
#ifdef AFD_X86
    return afd_cpu_avx2();
#else
    return 0;
#endif
}

static int parse_threads(int nthreads)
{
    if (nthreads < 1) {
        PyErr_SetString(PyExc_ValueError, "nthreads must be >= 1");
        return 0;
    }
    return 1;
}

/* F16C (widening the e4m3 cache): every AVX2 CPU made has it, but a virtual machine may hide it. */
static int f16c_ok(void)
{
#ifdef AFD_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

PyDoc_STRVAR(available_doc, "available() -> bool: the kernels can run on this CPU (x86-64 with AVX2 and FMA).");

static PyObject *available(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_ok());
}

PyDoc_STRVAR(features_doc,
             "features() -> dict: what this build and CPU offer: avx2 (AVX2 + FMA), avx512bf16\n"
             "(vdpbf16ps), f16c (an e4m3 KV cache in decode attention), openmp (built with OpenMP: the\n"
             "kernels split work over threads).");

static PyObject *features(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
#ifdef _OPENMP
    const int omp = 1;
#else
    const int omp = 0;
#endif
    return Py_BuildValue("{s:O,s:O,s:O,s:O}", "avx2", cpu_ok() ? Py_True : Py_False,
                         "avx512bf16", afd_cpu_avx512bf16() ? Py_True : Py_False,
                         "f16c", cpu_ok() && f16c_ok() ? Py_True : Py_False,
                         "openmp", omp ? Py_True : Py_False);
}

/* Checks shared by sgemm and bgemm; 0 with an exception set when they fail. */
static int gemm_args_ok(const char *name, Py_ssize_t px, Py_ssize_t ldx, Py_ssize_t pw, Py_ssize_t ldw,
                        Py_ssize_t py, Py_ssize_t ldy, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int transposed,
                        int nthreads)
{
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N || ldw < (transposed ? N : K) || !px || !pw || !py) {
        PyErr_Format(PyExc_ValueError, "%s: negative size, leading dimension too small or null buffer", name);
        return 0;
    }
    if (!parse_threads(nthreads)) return 0;
    if (!cpu_ok()) {
        PyErr_Format(PyExc_RuntimeError, "%s: this CPU lacks AVX2/FMA (or is not x86-64)", name);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(sgemm_doc,
             "sgemm(x, ldx, w, ldw, y, ldy, m, n, k, transposed, nthreads=1) -> None\n\n"
             "y[m, n] = x[m, k] @ W^T for fp32 row-major buffers given by address and leading\n"
             "dimension (in elements). W is [n, k] (ldw >= k), or [k, n] when `transposed`\n"
             "(ldw >= n). The n outputs are split over up to `nthreads` OpenMP threads (bitwise the\n"
             "same result). The caller guarantees the buffers; the GIL is released while it runs.");

static PyObject *sgemm(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, ldw, py, ldy, M, N, K;
    int transposed, nthreads = 1;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnp|i", &px, &ldx, &pw, &ldw, &py, &ldy, &M, &N, &K, &transposed,
                          &nthreads))
        return NULL;
    if (!gemm_args_ok("sgemm", px, ldx, pw, ldw, py, ldy, M, N, K, transposed, nthreads)) return NULL;
#ifdef AFD_X86
    if (M > 0 && N > 0) {
        const float *x = (const float *)px, *w = (const float *)pw;
        float *y = (float *)py;
        Py_BEGIN_ALLOW_THREADS
        if (K == 0) {
            for (Py_ssize_t m = 0; m < M; m++)
                for (Py_ssize_t n = 0; n < N; n++) y[m * ldy + n] = 0.f;
        } else {
            const int nt = afd_threads_for(N * K, nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
            for (int i = 0; i < nt; i++) {
                ptrdiff_t n0, n1;
                afd_split(N, nt, i, 8, &n0, &n1);
                if (n0 >= n1) continue;
                if (transposed)
                    gemm_axpy(x, ldx, w + n0, ldw, y + n0, ldy, M, n1 - n0, K);
                else
                    gemm_dot(x, ldx, w + n0 * ldw, ldw, y + n0, ldy, M, n1 - n0, K);
            }
        }
        Py_END_ALLOW_THREADS
    }
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(bgemm_doc,
             "bgemm(x, ldx, w, ldw, y, ldy, m, n, k, transposed, nthreads, isa, f32_out=False) -> None\n\n"
             "sgemm for bf16 buffers (fp32 accumulation, one rounding to nearest even per output).\n"
             "isa: 1 = AVX2 + FMA (both layouts), 2 = AVX512-BF16 vdpbf16ps ([n, k] layout only), 3 = the\n"
             "same over weights repacked per 32 outputs (many rows; [n, k] layout, even k). f32_out (isa 3\n"
             "only): y is fp32 and not rounded (attention scores).");

static PyObject *bgemm(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, ldw, py, ldy, M, N, K;
    int transposed, nthreads, isa, f32_out = 0;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnpii|p", &px, &ldx, &pw, &ldw, &py, &ldy, &M, &N, &K, &transposed,
                          &nthreads, &isa, &f32_out))
        return NULL;
    if (!gemm_args_ok("bgemm", px, ldx, pw, ldw, py, ldy, M, N, K, transposed, nthreads)) return NULL;
    if (isa != AFD_ISA_AVX2 && isa != AFD_ISA_AVX512BF16 && isa != AFD_ISA_AVX512BF16_PACKED) {
        PyErr_Format(PyExc_ValueError, "bgemm: isa must be 1 (AVX2), 2 (AVX512-BF16) or 3 (AVX512-BF16 "
                     "repacked), not %d", isa);
        return NULL;
    }
    if (isa != AFD_ISA_AVX2 && (transposed || !afd_cpu_avx512bf16())) {
        PyErr_SetString(PyExc_ValueError, transposed ? "bgemm: AVX512-BF16 reads the [n, k] layout only"
                                                     : "bgemm: this CPU lacks AVX512-BF16");
        return NULL;
    }
    if (isa == AFD_ISA_AVX512BF16_PACKED && K % 2) {
        PyErr_SetString(PyExc_ValueError, "bgemm: the repacked AVX512-BF16 kernel needs an even k");
        return NULL;
    }
    if (f32_out && isa != AFD_ISA_AVX512BF16_PACKED) {
        PyErr_SetString(PyExc_ValueError, "bgemm: fp32 outputs come from the repacked kernel (isa 3) only");
        return NULL;
    }
    const size_t elem = f32_out ? sizeof(float) : sizeof(uint16_t);
    int rc = 0;
    if (M > 0 && N > 0) {
        if (K == 0)
            for (Py_ssize_t m = 0; m < M; m++) memset((char *)py + (size_t)(m * ldy) * elem, 0, elem * (size_t)N);
        else {
            Py_BEGIN_ALLOW_THREADS
            if (f32_out)
                rc = afd_bgemm_f32((const uint16_t *)px, ldx, (const uint16_t *)pw, ldw, (float *)py, ldy, M, N, K,
                                   nthreads);
            else
                rc = afd_bgemm((const uint16_t *)px, ldx, (const uint16_t *)pw, ldw, (uint16_t *)py, ldy, M, N, K,
                               transposed, isa, nthreads);
            Py_END_ALLOW_THREADS
        }
    }
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(decode_attention_doc,
             "decode_attention(q, S, nq, d, k, v, num_blocks, g, bs, tables, max_blocks, lens, scale, out,\n"
             "                 nthreads=1, bf16=False, kv_e4m3=False, k_scale=1.0, v_scale=1.0, dp=False) -> None\n\n"
             "Attention of one new token per sequence over its paged K/V (fp32, or bf16 with fp32 math\n"
             "inside, buffers by address): q, out [S, nq, d]; k, v [num_blocks * bs, g, d]; tables\n"
             "With kv_e4m3, k and v are e4m3 bytes (value = code x k_scale / v_scale; needs F16C)\n"
             "and q / out are fp32 or bf16 (`bf16`). With `dp` (bf16 q and cache, even d, a CPU with\n"
             "AVX512-BF16), scores run on vdpbf16ps and values in 16-head zmm blocks; else AVX2 fp32.\n"
             "[S, max_blocks] int64 block ids; lens [S] int64 context lengths. Block ids and lengths\n"
             "are checked against the cache before anything is read; sequences x KV heads are split over\n"
             "up to `nthreads` OpenMP threads (bitwise the same result); the GIL is released.");

static PyObject *decode_attention(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pq, S, nq, d, pk, pv, num_blocks, g, bs, pt, max_blocks, pl, po;
    float scale;
    float k_scale = 1.0f, v_scale = 1.0f;
    int nthreads = 1, bf16 = 0, e4m3 = 0, dp = 0;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnfn|ippffp", &pq, &S, &nq, &d, &pk, &pv, &num_blocks, &g, &bs, &pt,
                          &max_blocks, &pl, &scale, &po, &nthreads, &bf16, &e4m3, &k_scale, &v_scale, &dp))
        return NULL;
    if (S < 0 || nq <= 0 || d <= 0 || g <= 0 || nq % g || bs <= 0 || num_blocks < 0 || max_blocks < 0 ||
        !pq || !pk || !pv || !pt || !pl || !po) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad sizes (need nq % g == 0) or null buffer");
        return NULL;
    }
    if (!parse_threads(nthreads)) return NULL;
    const int64_t *tables = (const int64_t *)pt, *lens = (const int64_t *)pl;
    Py_ssize_t max_ctx = 0, total_ctx = 0;
    for (Py_ssize_t s = 0; s < S; s++) {
        if (lens[s] <= 0 || lens[s] > max_blocks * bs) {
            PyErr_Format(PyExc_ValueError, "decode_attention: sequence %zd has context %lld, outside 1..%zd",
                         s, (long long)lens[s], max_blocks * bs);
            return NULL;
        }
        for (Py_ssize_t b = 0; b < (lens[s] + bs - 1) / bs; b++)
            if (tables[s * max_blocks + b] < 0 || tables[s * max_blocks + b] >= num_blocks) {
                PyErr_Format(PyExc_ValueError, "decode_attention: sequence %zd block %zd is %lld, outside 0..%zd",
                             s, b, (long long)tables[s * max_blocks + b], num_blocks - 1);
                return NULL;
            }
        max_ctx = lens[s] > max_ctx ? lens[s] : max_ctx;
        total_ctx += lens[s];
    }
    if (!cpu_ok() || (e4m3 && !f16c_ok())) {
        PyErr_SetString(PyExc_RuntimeError, "decode_attention: this CPU lacks AVX2/FMA (or F16C for an e4m3 "
                        "cache, or is not x86-64)");
        return NULL;
    }
#ifdef AFD_X86
    int rc = 0;
    if (S) {
        /* e4m3 rows are widened to value x 2^-8: the 2^8 goes into the query and output scales */
        const float ks = e4m3 ? k_scale * 256.0f : 1.0f, vs = e4m3 ? v_scale * 256.0f : 1.0f;
        attn_args a = {(const void *)pq, (const void *)pk, (const void *)pv, (void *)po, nq, d, g, bs, max_blocks,
                       max_ctx, tables, lens, scale * ks, vs, bf16, e4m3 ? KV_E4M3 : KV_AS_Q,
                       dp && bf16 && d % 2 == 0 && afd_cpu_avx512bf16()};
        Py_BEGIN_ALLOW_THREADS
        rc = attend(&a, S, total_ctx, nthreads);
        Py_END_ALLOW_THREADS
    }
    if (rc) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"features", features, METH_NOARGS, features_doc},
    {"sgemm", sgemm, METH_VARARGS, sgemm_doc},
    {"bgemm", bgemm, METH_VARARGS, bgemm_doc},
    {"decode_attention", decode_attention, METH_VARARGS, decode_attention_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "afdserve._native",
    "fp32 and bf16 decode kernels: GEMMs for few rows, attention over the paged KV cache, element-wise "
    "steps, MoE experts (see afdserve/native/decode_kernels.c, gemm_bf16.c, elementwise.c, moe.c)", -1, methods, NULL, NULL, NULL, NULL,
};

extern PyMethodDef afd_elementwise_methods[];      /* elementwise.c */
extern PyMethodDef afd_moe_methods[];              /* moe.c */

PyMODINIT_FUNC PyInit__native(void)
{
#ifdef KV_E4M3_LUT
    e4m3_table_init();
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddFunctions(m, afd_elementwise_methods) || PyModule_AddFunctions(m, afd_moe_methods))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
