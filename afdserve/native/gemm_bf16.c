/*
 * bf16 GEMMs for few rows: y[M, N] = x[M, K] @ W^T with bf16 x, W and y, fp32 accumulation and
 * one rounding (to nearest even) per output.
 *
 * A decode step streams every weight once, so bf16 weights halve the time of an fp32 step where
 * the kernel keeps up with memory. Two instruction sets, picked at run time by the caller
 * (afdserve/model/kernels.py, `KernelPolicy`):
 *  - AVX2 + FMA (every x86-64 CPU the fp32 kernels run on): eight bf16 weights are widened to
 *    fp32 by a zero-extension and a 16-bit shift (exact), then multiplied with x (converted to
 *    fp32 once per call) exactly as the fp32 kernels in decode_kernels.c do. Both layouts:
 *    [N, K] (checkpoint, "dot" form) and [K, N] (transposed storage, "axpy" form).
 *  - AVX512-BF16 (`vdpbf16ps`, AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+): 32 bf16 pairs
 *    per instruction straight from memory, no widening; [N, K] layout only (the instruction sums
 *    adjacent k pairs, which [K, N] storage does not hold next to each other).
 *
 * Threads: the N outputs are split into one contiguous range per thread (OpenMP, the runtime torch
 * itself uses; see decode_kernels.c), on multiples of 8 columns, so each output is computed by the
 * same instructions in the same order whatever the thread count: results are bitwise equal.
 */
#include <stdlib.h>

#include "afd_native.h"

#ifdef AFD_X86

/* ---- AVX2: [N, K] layout -------------------------------------------------------------------- */

/* bdot_MR_NR and gemm_bdot (afd_native.h): bf16 weights widened by a shift, fp32 x, bf16 outputs
   rounded once. */
AFD_DOT_GEMM(bdot, uint16_t, uint16_t, afd_bf16x8_to_ps, afd_bf16_to_f32, afd_f32_to_bf16, 32)

/* ---- AVX2: [K, N] layout -------------------------------------------------------------------- */

#define BKB AFD_KB
#define BY_TILE_BYTES (64 * 1024)  /* fp32 tile of the outputs, all rows of x together */

/* baxpy_1, baxpy_2, baxpy_rows (afd_native.h): bf16 weights widened by a shift, fp32 tile. */
AFD_AXPY_KERNELS(baxpy, uint16_t, afd_bf16x8_to_ps, afd_bf16_to_f32)

/* y = x @ wt over columns [0, N) of wt / y, through an fp32 tile `yt` of M x NT floats. */
TGT static void bgemm_axpy(const float *x, ptrdiff_t ldx, const uint16_t *wt, ptrdiff_t ldw, uint16_t *y,
                           ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, float *yt, ptrdiff_t NT)
{
    for (ptrdiff_t n0 = 0; n0 < N; n0 += NT) {
        ptrdiff_t nt = N - n0 < NT ? N - n0 : NT;
        ptrdiff_t k0 = 0;
        for (; k0 + BKB <= K; k0 += BKB)
            for (ptrdiff_t m = 0; m < M;) {
                const float *xm = x + m * ldx + k0;
                const uint16_t *wk = wt + k0 * ldw + n0;
                if (M - m >= 2) {
                    baxpy_2(xm, ldx, wk, ldw, yt + m * NT, NT, nt, k0 == 0);
                    m += 2;
                } else {
                    baxpy_1(xm, ldx, wk, ldw, yt + m * NT, NT, nt, k0 == 0);
                    m += 1;
                }
            }
        if (k0 < K) baxpy_rows(x + k0, ldx, wt + k0 * ldw + n0, ldw, yt, NT, M, nt, K - k0, k0 == 0);
        for (ptrdiff_t m = 0; m < M; m++)
            for (ptrdiff_t v = 0; v < nt; v++) y[m * ldy + n0 + v] = afd_f32_to_bf16(yt[m * NT + v]);
    }
}

/* ---- AVX512-BF16: [N, K] layout ------------------------------------------------------------- */

/* MR rows of x times NR rows of w, 32 bf16 pairs a step; the last K % 32 with masked loads (the
   zeros they fill in add nothing). */
#define DEFINE_BDOT512(MR, NR)                                                                      \
    TGT_BF16 static void bdot512_##MR##_##NR(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w,  \
                                             ptrdiff_t ldw, uint16_t *y, ptrdiff_t ldy, ptrdiff_t K, \
                                             int pf)                                                \
    {                                                                                               \
        __m512 acc[MR][NR];                                                                         \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) acc[m][n] = _mm512_setzero_ps();                           \
        ptrdiff_t k = 0;                                                                            \
        for (; k < K; k += 32) {                                                                    \
            __mmask32 mk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u); \
            __m512i wv[NR];                                                                         \
            for (int n = 0; n < NR; n++) wv[n] = _mm512_maskz_loadu_epi16(mk, w + n * ldw + k);     \
            if (pf)                                                                                 \
                for (int n = 0; n < NR; n++) __builtin_prefetch(w + (NR + n) * ldw + k, 0, 2);      \
            for (int m = 0; m < MR; m++) {                                                          \
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + m * ldx + k);              \
                for (int n = 0; n < NR; n++)                                                        \
                    acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, (__m512bh)wv[n]);                   \
            }                                                                                       \
        }                                                                                           \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) y[m * ldy + n] = afd_f32_to_bf16(_mm512_reduce_add_ps(acc[m][n])); \
    }

DEFINE_BDOT512(1, 8)
DEFINE_BDOT512(1, 4) DEFINE_BDOT512(2, 4) DEFINE_BDOT512(3, 4) DEFINE_BDOT512(4, 4)
DEFINE_BDOT512(1, 1) DEFINE_BDOT512(2, 1) DEFINE_BDOT512(3, 1) DEFINE_BDOT512(4, 1)

typedef void (*bdot512_fn)(const uint16_t *, ptrdiff_t, const uint16_t *, ptrdiff_t, uint16_t *, ptrdiff_t,
                           ptrdiff_t, int);
static const bdot512_fn bdot512_nr4[5] = {0, bdot512_1_4, bdot512_2_4, bdot512_3_4, bdot512_4_4};
static const bdot512_fn bdot512_nr1[5] = {0, bdot512_1_1, bdot512_2_1, bdot512_3_1, bdot512_4_1};

TGT_BF16 static void bgemm_dot512(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw,
                                  uint16_t *y, ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    ptrdiff_t n = 0;
    if (M == 1) {
        for (; n + 8 <= N; n += 8) bdot512_1_8(x, ldx, w + n * ldw, ldw, y + n, ldy, K, n + 16 <= N);
    } else {
        for (; n + 4 <= N; n += 4) {
            int pf = n + 8 <= N;
            for (ptrdiff_t m = 0; m < M;) {
                int mr = M - m >= 4 ? 4 : (int)(M - m);
                bdot512_nr4[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, pf && m == 0);
                m += mr;
            }
        }
    }
    for (; n < N; n++)
        for (ptrdiff_t m = 0; m < M;) {
            int mr = M - m >= 4 ? 4 : (int)(M - m);
            bdot512_nr1[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, 0);
            m += mr;
        }
}

int afd_cpu_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int afd_cpu_avx512bf16(void)
{
    __builtin_cpu_init();
    return afd_cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* One thread's share: output columns [n0, n1). xf: x widened to fp32 ([M, K], row stride K). */
static int bgemm_part(const uint16_t *x, ptrdiff_t ldx, const float *xf, const uint16_t *w, ptrdiff_t ldw,
                      uint16_t *y, ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K,
                      int transposed, int isa)
{
    if (n0 >= n1) return 0;
    if (transposed) {
        ptrdiff_t NT = BY_TILE_BYTES / (ptrdiff_t)sizeof(float) / M;
        if (NT < 256) NT = 256;
        NT &= ~(ptrdiff_t)7;
        float *yt = malloc(sizeof(float) * (size_t)(M * NT));
        if (!yt) return 1;
        bgemm_axpy(xf, K, w + n0, ldw, y + n0, ldy, M, n1 - n0, K, yt, NT);
        free(yt);
    } else if (isa == AFD_ISA_AVX512BF16) {
        bgemm_dot512(x, ldx, w + n0 * ldw, ldw, y + n0, ldy, M, n1 - n0, K);
    } else {
        gemm_bdot(xf, K, w + n0 * ldw, ldw, y + n0, ldy, M, n1 - n0, K);
    }
    return 0;
}

int afd_bgemm(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, uint16_t *y, ptrdiff_t ldy,
              ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int transposed, int isa, int nthreads)
{
    float *xf = NULL;
    if (transposed || isa != AFD_ISA_AVX512BF16) {
        xf = malloc(sizeof(float) * (size_t)(M * K + 1));
        if (!xf) return -1;
        for (ptrdiff_t m = 0; m < M; m++)
            for (ptrdiff_t k = 0; k < K; k++) xf[m * K + k] = afd_bf16_to_f32(x[m * ldx + k]);
    }
    const int nt = afd_threads_for(N * K, nthreads);
    int failed = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : failed) if (nt > 1)
    for (int i = 0; i < nt; i++) {
        ptrdiff_t n0, n1;
        afd_split(N, nt, i, 8, &n0, &n1);
        failed |= bgemm_part(x, ldx, xf, w, ldw, y, ldy, M, n0, n1, K, transposed, isa);
    }
    free(xf);
    return failed ? -1 : 0;
}

#else  /* not x86-64 */

int afd_cpu_avx2(void) { return 0; }
int afd_cpu_avx512bf16(void) { return 0; }

int afd_bgemm(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, uint16_t *y, ptrdiff_t ldy,
              ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int transposed, int isa, int nthreads)
{
    (void)x; (void)ldx; (void)w; (void)ldw; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    (void)transposed; (void)isa; (void)nthreads;
    return -1;
}

#endif
