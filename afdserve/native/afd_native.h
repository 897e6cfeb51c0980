/*
 * Shared definitions of afdserve._native's translation units (decode_kernels.c: fp32 GEMMs,
 * decode attention and the Python module; gemm_bf16.c: bf16 GEMMs).
 */
#ifndef AFD_NATIVE_H
#define AFD_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define AFD_X86 1
#include <immintrin.h>
#define TGT __attribute__((target("avx2,fma")))
#define TGT_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

TGT static inline float afd_hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits. */
TGT static inline __m256 afd_bf16x8_to_ps(const uint16_t *p)
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* Eight fp32 values rounded to bf16 (to nearest even, NaN kept quiet: afd_f32_to_bf16 per lane),
   returned as fp32 values (the low 16 bits zero). */
TGT static inline __m256 afd_round_bf16_ps(__m256 v)
{
    const __m256i u = _mm256_castps_si256(v), hi = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), hi);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i q = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), hi);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, q, nan));
}

/* Store eight values already rounded by afd_round_bf16_ps as bf16. */
TGT static inline void afd_store_bf16x8(uint16_t *p, __m256 rounded)
{
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}

/* exp(x) for eight fp32 values: 2^n * p(r) with r = x - n ln2 (in two parts) and a degree-6
   polynomial; within a few ulp of the exact value; x is clamped to [-87.3, 88.3] (normal results). */
TGT static inline __m256 afd_exp_ps(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

static inline float afd_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, round to nearest even (NaN stays a quiet NaN), as torch's .to(torch.bfloat16). */
static inline uint16_t afd_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef AFD_X86
/* ---- few-row GEMM over the [N, K] (checkpoint) layout, one template for every weight type ----
 * y[m, n] = dot(x[m, :], w[n, :]) with x in fp32. PREFIX names the kernels (PREFIX_MR_NR and
 * gemm_PREFIX); WT / YT: the stored weight and output element types; LOADW(p): eight weights from
 * p as fp32 (__m256); WF(v): one weight as float; STY(s): the output element of an fp32 sum;
 * PFSTEP: k elements between prefetches (64 bytes of weights). Blocking: one row of x against 8
 * weight rows; 2-3 rows against 4; groups of 4 rows against 3; the next block is prefetched while
 * the first group runs and later groups find it in L1. */
#define AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, MR, NR)                              \
    TGT static void PREFIX##_##MR##_##NR(const float *x, ptrdiff_t ldx, const WT *w, ptrdiff_t ldw, \
                                         YT *y, ptrdiff_t ldy, ptrdiff_t K, int pf)                \
    {                                                                                               \
        __m256 acc[MR][NR];                                                                         \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_ps();                           \
        ptrdiff_t k = 0;                                                                            \
        for (; k + 8 <= K; k += 8) {                                                                \
            __m256 wv[NR];                                                                          \
            for (int n = 0; n < NR; n++) wv[n] = LOADW(w + n * ldw + k);                            \
            if (pf && (k & (PFSTEP - 1)) == 0)                                                      \
                for (int n = 0; n < NR; n++) __builtin_prefetch(w + (NR + n) * ldw + k, 0, 2);      \
            for (int m = 0; m < MR; m++) {                                                          \
                __m256 xv = _mm256_loadu_ps(x + m * ldx + k);                                       \
                for (int n = 0; n < NR; n++) acc[m][n] = _mm256_fmadd_ps(wv[n], xv, acc[m][n]);     \
            }                                                                                       \
        }                                                                                           \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) {                                                          \
                float s = afd_hsum8(acc[m][n]);                                                     \
                for (ptrdiff_t kk = k; kk < K; kk++) s += x[m * ldx + kk] * WF(w[n * ldw + kk]);    \
                y[m * ldy + n] = STY(s);                                                            \
            }                                                                                       \
    }

#define AFD_DOT_GEMM(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP)                                        \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 1, 8)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 1, 4)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 2, 4)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 3, 4)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 1, 3)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 2, 3)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 3, 3)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 4, 3)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 1, 1)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 2, 1)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 3, 1)                                    \
    AFD_DOT_KERNEL(PREFIX, WT, YT, LOADW, WF, STY, PFSTEP, 4, 1)                                    \
    typedef void (*PREFIX##_fn)(const float *, ptrdiff_t, const WT *, ptrdiff_t, YT *, ptrdiff_t,   \
                                ptrdiff_t, int);                                                    \
    static const PREFIX##_fn PREFIX##_nr4[4] = {0, PREFIX##_1_4, PREFIX##_2_4, PREFIX##_3_4};       \
    static const PREFIX##_fn PREFIX##_nr3[5] = {0, PREFIX##_1_3, PREFIX##_2_3, PREFIX##_3_3, PREFIX##_4_3}; \
    static const PREFIX##_fn PREFIX##_nr1[5] = {0, PREFIX##_1_1, PREFIX##_2_1, PREFIX##_3_1, PREFIX##_4_1}; \
    TGT static void gemm_##PREFIX(const float *x, ptrdiff_t ldx, const WT *w, ptrdiff_t ldw, YT *y,  \
                                  ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)             \
    {                                                                                               \
        ptrdiff_t n = 0;                                                                            \
        if (M == 1) {                                                                               \
            for (; n + 8 <= N; n += 8) PREFIX##_1_8(x, ldx, w + n * ldw, ldw, y + n, ldy, K, 0);    \
        } else {                                                                                    \
            const int NR = M <= 3 ? 4 : 3;                                                          \
            const PREFIX##_fn *tab = NR == 4 ? PREFIX##_nr4 : PREFIX##_nr3;                          \
            for (; n + NR <= N; n += NR) {                                                          \
                int pf = n + 2 * NR <= N;                                                           \
                for (ptrdiff_t m = 0; m < M;) {                                                     \
                    int mr = M - m >= 4 ? 4 : (int)(M - m);                                         \
                    tab[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, pf && m == 0); \
                    m += mr;                                                                        \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (; n < N; n++)                                                                          \
            for (ptrdiff_t m = 0; m < M;) {                                                         \
                int mr = M - m >= 4 ? 4 : (int)(M - m);                                             \
                PREFIX##_nr1[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, 0);   \
                m += mr;                                                                            \
            }                                                                                       \
    }

/* ---- few-row GEMM over [K, N] (transposed) storage: the inner kernels, one template ---------------
 * y[0:MR, 0:nt] (= when `first`, else +=) x[0:MR, 0:AFD_KB] @ wt[0:AFD_KB, 0:nt], y fp32:
 * PREFIX_1 and PREFIX_2 (rows of x), and PREFIX_rows for the last K % AFD_KB rows of wt, one at a
 * time. WT: the stored weight type; LOADW(p): eight weights as fp32; WF(v): one weight as float. */
#define AFD_KB 8                   /* rows of wt streamed together */
#define AFD_AXPY_KERNEL(PREFIX, WT, LOADW, WF, MR)                                                  \
    TGT static void PREFIX##_##MR(const float *x, ptrdiff_t ldx, const WT *wt, ptrdiff_t ldw,      \
                                  float *y, ptrdiff_t ldy, ptrdiff_t nt, int first)                 \
    {                                                                                               \
        __m256 b[MR][AFD_KB];                                                                       \
        for (int m = 0; m < MR; m++)                                                                \
            for (int j = 0; j < AFD_KB; j++) b[m][j] = _mm256_broadcast_ss(x + m * ldx + j);        \
        ptrdiff_t v = 0;                                                                            \
        for (; v + 8 <= nt; v += 8) {                                                               \
            __m256 wv[AFD_KB];                                                                      \
            for (int j = 0; j < AFD_KB; j++) wv[j] = LOADW(wt + j * ldw + v);                       \
            for (int m = 0; m < MR; m++) {                                                          \
                __m256 a = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + m * ldy + v);          \
                for (int j = 0; j < AFD_KB; j++) a = _mm256_fmadd_ps(wv[j], b[m][j], a);            \
                _mm256_storeu_ps(y + m * ldy + v, a);                                               \
            }                                                                                       \
        }                                                                                           \
        for (; v < nt; v++)                                                                         \
            for (int m = 0; m < MR; m++) {                                                          \
                float s = first ? 0.f : y[m * ldy + v];                                             \
                for (int j = 0; j < AFD_KB; j++) s += x[m * ldx + j] * WF(wt[j * ldw + v]);         \
                y[m * ldy + v] = s;                                                                 \
            }                                                                                       \
    }

#define AFD_AXPY_KERNELS(PREFIX, WT, LOADW, WF)                                                     \
    AFD_AXPY_KERNEL(PREFIX, WT, LOADW, WF, 1)                                                       \
    AFD_AXPY_KERNEL(PREFIX, WT, LOADW, WF, 2)                                                       \
    static void PREFIX##_rows(const float *x, ptrdiff_t ldx, const WT *wt, ptrdiff_t ldw, float *y, \
                              ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t nt, ptrdiff_t rows, int first)  \
    {                                                                                               \
        for (ptrdiff_t m = 0; m < M; m++)                                                           \
            for (ptrdiff_t v = 0; v < nt; v++) {                                                    \
                float s = first ? 0.f : y[m * ldy + v];                                             \
                for (ptrdiff_t j = 0; j < rows; j++) s += x[m * ldx + j] * WF(wt[j * ldw + v]);     \
                y[m * ldy + v] = s;                                                                 \
            }                                                                                       \
    }
#endif

/* Smallest number of weight elements worth a thread of its own: below it the fork/join of the
   OpenMP team costs more than the work it splits (afdserve/native/decode_kernels.c). */
#define AFD_MIN_ELEMS_PER_THREAD (32 * 1024)

/* Threads to use for `work` elements when `nthreads` are allowed. */
static inline int afd_threads_for(ptrdiff_t work, int nthreads)
{
#ifdef _OPENMP
    ptrdiff_t most = work / AFD_MIN_ELEMS_PER_THREAD;
    if (most < 1) most = 1;
    return nthreads < most ? (nthreads < 1 ? 1 : nthreads) : (int)most;
#else
    (void)work;
    (void)nthreads;
    return 1;
#endif
}

/* Column range [*n0, *n1) of part `i` of `parts` over N columns, boundaries on multiples of
   `align` (so every part runs the same vector / tail code per column as one part would). */
static inline void afd_split(ptrdiff_t N, int parts, int i, ptrdiff_t align, ptrdiff_t *n0, ptrdiff_t *n1)
{
    ptrdiff_t blocks = (N + align - 1) / align, per = blocks / parts, extra = blocks % parts;
    ptrdiff_t b0 = i * per + (i < extra ? i : extra), b1 = b0 + per + (i < extra ? 1 : 0);
    *n0 = b0 * align < N ? b0 * align : N;
    *n1 = b1 * align < N ? b1 * align : N;
}

/* AVX512BF16_PACKED: vdpbf16ps over weights repacked per 32-column block into k-pair-major order
   (gemm_bf16.c), for many rows. */
/* This thread's number in the OpenMP team running it (0 outside one, or without OpenMP). */
static inline int afd_thread_num(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

enum afd_isa { AFD_ISA_AVX2 = 1, AFD_ISA_AVX512BF16 = 2, AFD_ISA_AVX512BF16_PACKED = 3 };

int afd_cpu_avx2(void);
int afd_cpu_avx512bf16(void);

/* y[M, N] (bf16) = x[M, K] (bf16) @ W^T, W bf16 [N, K] (ldw >= K) or, `transposed`, [K, N]
   (ldw >= N); fp32 accumulation, one rounding at the end. `isa` picks the instruction set
   (AVX512-BF16 only for the [N, K] layout). Returns 0, or -1 when out of memory. */
int afd_bgemm(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, uint16_t *y, ptrdiff_t ldy,
              ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int transposed, int isa, int nthreads);

int afd_bgemm_f32(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, float *y, ptrdiff_t ldy,
                  ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int nthreads);

/* elementwise.c: y[0:W] = silu(gu[0:W]) * gu[W:2W] of one row, bf16 (bf16 != 0) or fp32 */
void afd_silu_mul_row(const void *gu, void *y, ptrdiff_t W, int bf16);

#endif
