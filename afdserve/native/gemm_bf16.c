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

/* ---- AVX512-BF16, many rows: weights repacked per block of 32 outputs ------------------------
 * With enough rows of x to reuse every weight many times, the dot form above spends its time on
 * loads and horizontal sums. Here a block of 32 weight rows [32, K] is first transposed, as 32-bit
 * k pairs, into b[K/2][32] (a per-thread buffer that stays in L1/L2), and then PK_MR rows of x at a
 * time multiply it: a k pair of one row of x, broadcast, against the 32 outputs' pairs is two
 * vdpbf16ps into two accumulators, with no horizontal sum at all (one thread measured ~97% of the
 * instruction's peak without the repacking, ~85% with it). K must be even. */
#define PK_NB 32
#define PK_MR 12

/* 16 x 16 transpose of 32-bit elements (k pairs): dst[j * ldd + i] = pair j of row i of src. */
TGT_BF16 static void pk_transpose16(const uint16_t *src, ptrdiff_t lds, uint32_t *dst, ptrdiff_t ldd)
{
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * lds);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + i * ldd, r[i]);
}

static inline uint32_t pk_pair(const uint16_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* b[kp][0:32] = k pair kp of weight rows 0..nr-1 of w (rows nr..31: zero), kp < K2. */
TGT_BF16 static void pk_pack(const uint16_t *w, ptrdiff_t ldw, ptrdiff_t nr, ptrdiff_t K2, uint32_t *b)
{
    ptrdiff_t kp = 0;
    if (nr == PK_NB)
        for (; kp + 16 <= K2; kp += 16) {
            pk_transpose16(w + 2 * kp, ldw, b + kp * PK_NB, PK_NB);
            pk_transpose16(w + 16 * ldw + 2 * kp, ldw, b + kp * PK_NB + 16, PK_NB);
        }
    for (; kp < K2; kp++)
        for (ptrdiff_t n = 0; n < PK_NB; n++) b[kp * PK_NB + n] = n < nr ? pk_pair(w + n * ldw + 2 * kp) : 0u;
}

/* 16 fp32 -> bf16, round to nearest even, NaN kept quiet: afd_f32_to_bf16 on each lane. */
TGT_BF16 static inline __m256i pk_round(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

/* While the first group of rows is multiplied, the next block's 32 weight rows are prefetched into
   L2, two 64-byte lines per k pair (K2 pairs: 32 rows x K/32 lines): spread over the block's
   arithmetic instead of a burst the memory system drops. `next`: NULL for none. */
#define DEFINE_PK(MR)                                                                                 \
    TGT_BF16 static void pk_##MR(const uint16_t *x, ptrdiff_t ldx, const uint32_t *b, ptrdiff_t K2,  \
                                 uint16_t *y, float *yf, ptrdiff_t ldy, __mmask32 nmask,              \
                                 const uint16_t *next, ptrdiff_t ldw)                                 \
    {                                                                                                 \
        __m512 acc[MR][2];                                                                            \
        const ptrdiff_t lines = (2 * K2 + 31) / 32;                                                   \
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                     \
        for (ptrdiff_t kp = 0; kp < K2; kp++) {                                                       \
            if (next)                                                                                 \
                for (ptrdiff_t l = 2 * kp; l < 2 * kp + 2; l++)                                       \
                    __builtin_prefetch(next + (l / lines) * ldw + (l % lines) * 32, 0, 1);            \
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * PK_NB);                        \
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * PK_NB + 16);                   \
            for (int r = 0; r < MR; r++) {                                                            \
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pk_pair(x + r * ldx + 2 * kp));  \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);                                       \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);                                       \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < MR; r++)                                                                  \
            if (yf) {                                                                                 \
                _mm512_mask_storeu_ps(yf + r * ldy, (__mmask16)nmask, acc[r][0]);                    \
                _mm512_mask_storeu_ps(yf + r * ldy + 16, (__mmask16)(nmask >> 16), acc[r][1]);       \
            } else {                                                                                  \
                _mm256_mask_storeu_epi16(y + r * ldy, (__mmask16)nmask, pk_round(acc[r][0]));         \
                _mm256_mask_storeu_epi16(y + r * ldy + 16, (__mmask16)(nmask >> 16), pk_round(acc[r][1])); \
            }                                                                                         \
    }

DEFINE_PK(1) DEFINE_PK(2) DEFINE_PK(3) DEFINE_PK(4) DEFINE_PK(5) DEFINE_PK(6)
DEFINE_PK(7) DEFINE_PK(8) DEFINE_PK(9) DEFINE_PK(10) DEFINE_PK(11) DEFINE_PK(12)

typedef void (*pk_fn)(const uint16_t *, ptrdiff_t, const uint32_t *, ptrdiff_t, uint16_t *, float *, ptrdiff_t,
                      __mmask32, const uint16_t *, ptrdiff_t);
static const pk_fn pk_rows[PK_MR + 1] = {0, pk_1, pk_2, pk_3, pk_4, pk_5, pk_6, pk_7, pk_8, pk_9, pk_10, pk_11, pk_12};

/* y[:, 0:N] (bf16; or yf, fp32, unrounded, when y is NULL) for weight rows w[0:N] (one thread's
   share); 1 when the buffer cannot be had. */
TGT_BF16 static int bgemm_packed(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, uint16_t *y,
                                 float *yf, ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    const ptrdiff_t K2 = K / 2;
    char *raw = malloc(sizeof(uint32_t) * (size_t)(K2 * PK_NB) + 64);
    if (!raw) return 1;
    uint32_t *b = (uint32_t *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    for (ptrdiff_t n = 0; n < N; n += PK_NB) {
        const ptrdiff_t nr = N - n < PK_NB ? N - n : PK_NB;
        pk_pack(w + n * ldw, ldw, nr, K2, b);
        const __mmask32 mask = nr == PK_NB ? (__mmask32)0xffffffffu : (__mmask32)((1u << nr) - 1u);
        const uint16_t *next = n + 2 * PK_NB <= N ? w + (n + PK_NB) * ldw : NULL;
        for (ptrdiff_t m = 0; m < M; m += PK_MR) {
            const int mr = M - m < PK_MR ? (int)(M - m) : PK_MR;
            pk_rows[mr](x + m * ldx, ldx, b, K2, y ? y + m * ldy + n : NULL, y ? NULL : yf + m * ldy + n, ldy,
                        mask, m ? NULL : next, ldw);
        }
    }
    free(raw);
    return 0;
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
    } else if (isa == AFD_ISA_AVX512BF16_PACKED) {
        return bgemm_packed(x, ldx, w + n0 * ldw, ldw, y + n0, NULL, ldy, M, n1 - n0, K);
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
    if (transposed || isa == AFD_ISA_AVX2) {
        xf = malloc(sizeof(float) * (size_t)(M * K + 1));
        if (!xf) return -1;
        for (ptrdiff_t m = 0; m < M; m++)
            for (ptrdiff_t k = 0; k < K; k++) xf[m * K + k] = afd_bf16_to_f32(x[m * ldx + k]);
    }
    const int nt = afd_threads_for(N * K, nthreads);
    int failed = 0;
    if (nt == 1)                   /* no OpenMP construct at all: callers may run inside a team */
        failed = bgemm_part(x, ldx, xf, w, ldw, y, ldy, M, 0, N, K, transposed, isa);
    else {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : failed)
        for (int i = 0; i < nt; i++) {
            ptrdiff_t n0, n1;
            afd_split(N, nt, i, isa == AFD_ISA_AVX512BF16_PACKED ? PK_NB : 8, &n0, &n1);
            failed |= bgemm_part(x, ldx, xf, w, ldw, y, ldy, M, n0, n1, K, transposed, isa);
        }
    }
    free(xf);
    return failed ? -1 : 0;
}

/* y (fp32, unrounded) = x @ W^T for bf16 x [M, K] and W [N, K] with the repacked AVX512-BF16
   kernel (K even); outputs split over the threads on multiples of 32 columns. */
int afd_bgemm_f32(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, float *y, ptrdiff_t ldy,
                  ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int nthreads)
{
    const int nt = afd_threads_for(N * K, nthreads);
    int failed = 0;
    if (nt == 1)
        failed = bgemm_packed(x, ldx, w, ldw, NULL, y, ldy, M, N, K);
    else {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : failed)
        for (int i = 0; i < nt; i++) {
            ptrdiff_t n0, n1;
            afd_split(N, nt, i, PK_NB, &n0, &n1);
            if (n0 < n1) failed |= bgemm_packed(x, ldx, w + n0 * ldw, ldw, NULL, y + n0, ldy, M, n1 - n0, K);
        }
    }
    return failed ? -1 : 0;
}

#else  /* not x86-64 */

int afd_bgemm_f32(const uint16_t *x, ptrdiff_t ldx, const uint16_t *w, ptrdiff_t ldw, float *y, ptrdiff_t ldy,
                  ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int nthreads)
{
    (void)x; (void)ldx; (void)w; (void)ldw; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)nthreads;
    return -1;
}


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
