/*
 * afdserve._fp8: GEMMs for few rows over block-scaled FP8 (e4m3) weights, x86-64 with AVX2 + FMA + F16C.
 *
 * y[M, N] = x[M, K] @ W^T, W [N, K] stored as e4m3 bytes (row-major, leading dimension ldw) with one
 * fp32 scale per (row block, 128-column block): W[n, k] = e4m3(codes[n, k]) * S[(n + row_off) / row_block,
 * (k + col_off) / 128]. The offsets let a weight that is a slice of a checkpoint tensor (an FFN shard)
 * keep the checkpoint's block grid.
 *
 * A decode step streams every weight once for 1-16 rows, so the time is the time to read the bytes;
 * reading one byte per weight instead of two (bf16) or four (fp32) is the point of FP8. The bytes are
 * widened in registers and never written back:
 *   - e4m3 -> fp16 bit pattern with two shifts and masks (sign to bit 15, exponent + mantissa to bits
 *     7..14): the fp16 number is the e4m3 value / 2^8 for normals and subnormals alike (the exponent
 *     biases differ by 8); F16C's vcvtph2ps widens 8 of them to fp32 in one instruction. The factor 2^8
 *     is folded into the scale. Codes 0x7f / 0xff (NaN in e4m3fn) are not decoded as NaN: the loader
 *     refuses weights holding them.
 *   - the block scale is applied to x instead of W: for each run of weight rows sharing a scale row,
 *     x' = x * S[row block, k / 128] is formed once (M*K products for row_block rows of W), so the inner
 *     loop is a plain dot product of converted weights with x'.
 * Work is split over torch's OpenMP threads (the extension links the libgomp torch loaded; see
 * setup.py) by blocks of weight rows; products under PAR_MIN weights stay on one thread.
 * Accumulation is fp32. Results equal dequantize-then-matmul up to fp32 summation order (the
 * dequantized values are the same numbers; tests/test_fp8.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
static int max_threads(void) { return omp_get_max_threads(); }
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int max_threads(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

/* Products smaller than this many weights run on one thread (a parallel region costs a few us). */
#define PAR_MIN (1 << 18)

static float LUT[256];          /* e4m3fn code -> value (NaN for 0x7f / 0xff), for the K tails */
/* High and low byte of the bf16 number equal to e4m3 magnitude code c (0..127): every e4m3 value,
   subnormals included, is a normal bf16 number (at most 4 significant bits, exponents 2^-9..2^8). */
static uint8_t BF16_HI[128], BF16_LO[128];

static void build_lut(void)
{
    for (int i = 0; i < 256; i++) {
        int e = (i >> 3) & 15, m = i & 7;
        float v = (i & 0x7f) == 0x7f ? NAN : (e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9));
        LUT[i] = (i & 0x80) ? -v : v;
    }
    for (int c = 0; c < 128; c++) {
        union { float f; uint32_t u; } b = {LUT[c]};
        BF16_HI[c] = (uint8_t)(b.u >> 24);
        BF16_LO[c] = (uint8_t)(b.u >> 16);
    }
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define AFD_X86 1
#include <immintrin.h>
#define TGT __attribute__((target("avx2,fma,f16c")))
#define INL __attribute__((always_inline)) inline
#define UNROLL _Pragma("GCC unroll 8")

TGT static INL float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Software prefetch: PF_ROWS weight rows ahead of the row being read, into L2 (_MM_HINT_T1). Into L1
   (T0) the streams ran at half the speed on AMD Zen 4 (benchmarks/fp8_kernel_bench.py, docs/fp8.md). */
#ifndef PF_ROWS
#define PF_ROWS 16
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif

/* 16 e4m3 codes -> 16 fp32 values / 2^8, in two registers. */
TGT static INL void widen16(const uint8_t *p, __m256 *lo, __m256 *hi)
{
    /* sign-extended code << 7: the sign lands in bits 15 and 14, exponent + mantissa in 13..7; clear 14. */
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i f = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xbf80));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(f));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(f, 1));
}

/* NR weight rows x MG rows of x' (already scaled by 2^8 * block scale): y[m * ldy + r] = dot. */
TGT static INL void dot_tile(const float *xs, ptrdiff_t K, const uint8_t *w, ptrdiff_t ldw, float *y,
                             ptrdiff_t ldy, const int NR, const int MG)
{
    __m256 acc[4][4];
    UNROLL for (int r = 0; r < NR; r++)
        UNROLL for (int m = 0; m < MG; m++) acc[r][m] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 lo[4], hi[4];
        if ((k & 63) == 0)
            UNROLL for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w + (r + PF_ROWS) * ldw + k), PF_HINT);
        UNROLL for (int r = 0; r < NR; r++) widen16(w + r * ldw + k, &lo[r], &hi[r]);
        UNROLL for (int m = 0; m < MG; m++) {
            __m256 a = _mm256_loadu_ps(xs + m * K + k), b = _mm256_loadu_ps(xs + m * K + k + 8);
            UNROLL for (int r = 0; r < NR; r++)
                acc[r][m] = _mm256_fmadd_ps(hi[r], b, _mm256_fmadd_ps(lo[r], a, acc[r][m]));
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MG; m++) {
            float s = hsum8(acc[r][m]);
            for (ptrdiff_t t = k; t < K; t++) s += LUT[w[r * ldw + t]] * (1.f / 256.f) * xs[m * K + t];
            y[m * ldy + r] = s;
        }
}

/* Rows [0, n) of W, all sharing one scale row, times the MG-row x' group. */
TGT static void rows_group(const float *xs, ptrdiff_t K, const uint8_t *w, ptrdiff_t ldw, float *y, ptrdiff_t ldy,
                           ptrdiff_t n, int mg)
{
    ptrdiff_t r = 0;
#define RUN(NR, MG) for (; r + NR <= n; r += NR) dot_tile(xs, K, w + r * ldw, ldw, y + r, ldy, NR, MG)
    switch (mg) {
    case 1: RUN(4, 1); RUN(1, 1); break;
    case 2: RUN(4, 2); RUN(1, 2); break;
    case 3: RUN(2, 3); RUN(1, 3); break;
    default: RUN(2, 4); RUN(1, 4); break;
    }
#undef RUN
}

/* x'[m, k] = x[m, k] * 2^8 * s[(k + col_off) / 128] for one scale row s. */
TGT static void scale_x(const float *x, ptrdiff_t ldx, ptrdiff_t M, ptrdiff_t K, const float *s, ptrdiff_t col_off,
                    float *xs)
{
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t k = 0; k < K; k++) xs[m * K + k] = x[m * ldx + k] * (256.f * s[(k + col_off) >> 7]);
}

TGT static void fp8_gemm(const float *x, ptrdiff_t ldx, const uint8_t *w, ptrdiff_t ldw, const float *S,
                         ptrdiff_t lds, ptrdiff_t row_block, ptrdiff_t row_off, ptrdiff_t col_off, float *y,
                         ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, float *xs_all)
{
    /* One task per scale row of W (row_block rows), each scaling x by its scale row into the thread's
       own x' buffer, split over the OpenMP threads (torch's pool). Smaller tasks (32 rows) balance 5
       blocks over 2 threads better but cost more than they gain: x' is formed 4x as often (measured
       with benchmarks/fp8_kernel_bench.py). Small products stay on one thread. */
    const ptrdiff_t nseg = (N + row_off + row_block - 1) / row_block;
#pragma omp parallel if (N * K >= PAR_MIN && nseg > 1)
    {
        float *xs = xs_all + (size_t)thread_id() * (size_t)(M * K);
#pragma omp for schedule(static)
        for (ptrdiff_t sg = 0; sg < nseg; sg++) {
            ptrdiff_t n0 = sg * row_block - row_off, n1 = n0 + row_block;
            n0 = n0 < 0 ? 0 : n0;
            n1 = n1 > N ? N : n1;
            scale_x(x, ldx, M, K, S + sg * lds, col_off, xs);
            for (ptrdiff_t m0 = 0; m0 < M; m0 += 4) {
                int mg = (int)(M - m0 < 4 ? M - m0 : 4);
                rows_group(xs + m0 * K, K, w + n0 * ldw, ldw, y + m0 * ldy + n0, ldy, n1 - n0, mg);
            }
        }
    }
}

/* out[i, j] = e4m3(w[i, j]) * S[(i + row_off) / row_block, (j + col_off) / 128] (the many-row path's tiles). */
TGT static void dequant(const uint8_t *w, ptrdiff_t ldw, const float *S, ptrdiff_t lds, ptrdiff_t row_block,
                        ptrdiff_t row_off, ptrdiff_t col_off, float *out, ptrdiff_t ldo, ptrdiff_t N, ptrdiff_t K)
{
#pragma omp parallel for schedule(static) if (N * K >= PAR_MIN)
    for (ptrdiff_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * ldw;
        const float *s = S + (n + row_off) / row_block * lds;
        float *o = out + n * ldo;
        for (ptrdiff_t k = 0; k < K;) {
            ptrdiff_t kb = (k + col_off) >> 7, kend = (kb + 1) * 128 - col_off;
            if (kend > K) kend = K;
            __m256 sv = _mm256_set1_ps(256.f * s[kb]);
            for (; k + 16 <= kend; k += 16) {
                __m256 lo, hi;
                widen16(wr + k, &lo, &hi);
                _mm256_storeu_ps(o + k, _mm256_mul_ps(lo, sv));
                _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(hi, sv));
            }
            for (; k < kend; k++) o[k] = LUT[wr[k]] * s[kb];
        }
    }
}

/* ---- AVX512-BF16 + VBMI (bf16 runs): 64 codes -> 64 bf16 by two 128-entry byte lookups (vpermi2b),
   multiplied with bf16 x by vdpbf16ps (fp32 accumulation; products of two bf16 numbers are exact).
   unpacklo/hi interleave the bytes lane by lane, so x is stored in the same order (`permute_x`):
   per 64 columns, the 32 "lo" columns (16L + 0..7 of each 128-bit lane L), then the 32 "hi" ones. */
#define TGT512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")))

typedef struct {
    __m512i hi0, hi1, lo0, lo1, sign;
} bf16_tables;

TGT512 static INL void widen64_bf16(const uint8_t *p, const bf16_tables *t, __m512i *a, __m512i *b)
{
    __m512i c = _mm512_loadu_si512((const void *)p);
    __m512i hi = _mm512_permutex2var_epi8(t->hi0, c, t->hi1), lo = _mm512_permutex2var_epi8(t->lo0, c, t->lo1);
    hi = _mm512_ternarylogic_epi32(hi, c, t->sign, 0xF8);          /* hi | (c & 0x80): the sign */
    *a = _mm512_unpacklo_epi8(lo, hi);
    *b = _mm512_unpackhi_epi8(lo, hi);
}

static void permute_x(const uint16_t *x, ptrdiff_t ldx, ptrdiff_t M, ptrdiff_t K64, uint16_t *xp)
{
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t k0 = 0; k0 < K64; k0 += 64)
            for (int L = 0; L < 4; L++)
                for (int i = 0; i < 8; i++) {
                    xp[m * K64 + k0 + 8 * L + i] = x[m * ldx + k0 + 16 * L + i];
                    xp[m * K64 + k0 + 32 + 8 * L + i] = x[m * ldx + k0 + 16 * L + 8 + i];
                }
}

/* Round to nearest even, NaN kept NaN (what torch's float -> bfloat16 conversion does). */
static INL uint16_t f32_to_bf16(float f)
{
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static INL float bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}


/* The scalar part of one output: columns [K64, K) of weight row w (scale row s) times x row xr. */
static INL float tail_bf16(const uint8_t *w, const float *s, const uint16_t *xr, ptrdiff_t K64, ptrdiff_t K)
{
    float v = 0.f;
    for (ptrdiff_t k = K64; k < K; k++) v += LUT[w[k]] * s[k >> 7] * bf16_to_f32(xr[k]);
    return v;
}

/* NR weight rows (scale rows s[r]) x MG rows of x (NR x MG <= 8), straight from registers: each 64-code
   chunk of a row is widened once and meets every row of x before the next row is widened (so the
   registers hold one widened chunk at a time: no spills). Per 128-column block the fp32 partial
   sums are multiplied by the block's scale once. */
TGT512 static INL void dot_tile_bf16(const uint16_t *xp, ptrdiff_t K64, const uint16_t *x, ptrdiff_t ldx,
                                     ptrdiff_t K, const uint8_t *w, ptrdiff_t ldw, const float *const *s,
                                     const bf16_tables *t, float *y, ptrdiff_t ldy, const int NR, const int MG)
{
    __m512 tot[4][4];
    UNROLL for (int r = 0; r < NR; r++)
        UNROLL for (int m = 0; m < MG; m++) tot[r][m] = _mm512_setzero_ps();
    for (ptrdiff_t k0 = 0; k0 < K64; k0 += 128) {
        __m512 acc[4][4];
        UNROLL for (int r = 0; r < NR; r++)
            UNROLL for (int m = 0; m < MG; m++) acc[r][m] = _mm512_setzero_ps();
        const ptrdiff_t kend = k0 + 128 < K64 ? k0 + 128 : K64;
        for (ptrdiff_t k = k0; k < kend; k += 64)
            UNROLL for (int r = 0; r < NR; r++) {
                __m512i a, b;
                _mm_prefetch((const char *)(w + (r + PF_ROWS) * ldw + k), PF_HINT);
                widen64_bf16(w + r * ldw + k, t, &a, &b);
                UNROLL for (int m = 0; m < MG; m++) {
                    __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)(xp + m * K64 + k));
                    __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(xp + m * K64 + k + 32));
                    acc[r][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][m], (__m512bh)a, xa), (__m512bh)b, xb);
                }
            }
        UNROLL for (int r = 0; r < NR; r++) {
            __m512 sv = _mm512_set1_ps(s[r][k0 >> 7]);
            UNROLL for (int m = 0; m < MG; m++) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MG; m++)
            y[m * ldy + r] = _mm512_reduce_add_ps(tot[r][m]) + tail_bf16(w + r * ldw, s[r], x + m * ldx, K64, K);
}

/* One tile: weight rows [n0, n0 + nr) (nr <= 4) times all M rows of x, in groups of up to 4 rows of x
   (with more rows the codes are widened once per group: measured as fast as widening them once
   into an L1 buffer that every row reads, at 8 and 16 rows). */
TGT512 static void tile_bf16(const uint16_t *xp, ptrdiff_t K64, const uint16_t *x, ptrdiff_t ldx, ptrdiff_t K,
                             const uint8_t *w, ptrdiff_t ldw, const float *const *s, const bf16_tables *t, float *y,
                             ptrdiff_t ldy, int nr, ptrdiff_t M)
{
    for (ptrdiff_t m0 = 0; m0 < M; m0 += 4) {
        const int mg = M - m0 < 4 ? (int)(M - m0) : 4;
        const uint16_t *xm = xp + m0 * K64, *xr = x + m0 * ldx;
        float *ym = y + m0 * ldy;
        int r = 0;
#define TILE(NR, MG) dot_tile_bf16(xm, K64, xr, ldx, K, w + r * ldw, ldw, s + r, t, ym + r, ldy, NR, MG)
        switch (mg) {
        case 1: for (; r + 4 <= nr; r += 4) TILE(4, 1); for (; r < nr; r++) TILE(1, 1); break;
        case 2: for (; r + 4 <= nr; r += 4) TILE(4, 2); for (; r < nr; r++) TILE(1, 2); break;
        case 3: for (; r + 2 <= nr; r += 2) TILE(2, 3); for (; r < nr; r++) TILE(1, 3); break;
        default: for (; r + 2 <= nr; r += 2) TILE(2, 4); for (; r < nr; r++) TILE(1, 4); break;
        }
#undef TILE
    }
}

TGT512 static void fp8_gemm_bf16(const uint16_t *x, ptrdiff_t ldx, const uint8_t *w, ptrdiff_t ldw, const float *S,
                                 ptrdiff_t lds, ptrdiff_t row_block, ptrdiff_t row_off, float *y, ptrdiff_t ldy,
                                 ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, uint16_t *xp, int nthreads)
{
    const ptrdiff_t K64 = K / 64 * 64;
    bf16_tables t = {_mm512_loadu_si512(BF16_HI), _mm512_loadu_si512(BF16_HI + 64), _mm512_loadu_si512(BF16_LO),
                     _mm512_loadu_si512(BF16_LO + 64), _mm512_set1_epi8((char)0x80)};
    permute_x(x, ldx, M, K64, xp);
    const ptrdiff_t ntiles = (N + 3) / 4;
    /* Each thread takes one contiguous range of tiles (static schedule): it streams one region. */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N * K >= PAR_MIN && ntiles > 1)
    for (ptrdiff_t tile = 0; tile < ntiles; tile++) {
        ptrdiff_t n0 = tile * 4, nr = N - n0 < 4 ? N - n0 : 4;
        const float *s[4];
        for (ptrdiff_t r = 0; r < nr; r++) s[r] = S + (n0 + r + row_off) / row_block * lds;
        tile_bf16(xp, K64, x, ldx, K, w + n0 * ldw, ldw, s, &t, y + n0, ldy, (int)nr, M);
    }
}

/* y [M, N] (bf16, leading dimension ldy) = x [M, K] (bf16) @ W^T for e4m3 W with its block scales, on
   up to nthreads threads (1: no team, e.g. inside the MoE's per-expert team); 0, or -1 out of memory.
   The Python binding `gemm_bf16` and afdserve._native's MoE (through `gemm_bf16_address`) both run
   this function, so a product has the same bits from either. The caller checks the CPU (cpu_bf16). */
int afd_fp8_gemm_bf16(const uint16_t *x, ptrdiff_t ldx, const uint8_t *w, ptrdiff_t ldw, const float *S,
                      ptrdiff_t lds, ptrdiff_t row_block, ptrdiff_t row_off, uint16_t *y, ptrdiff_t ldy,
                      ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int nthreads)
{
    if (M == 0 || N == 0) return 0;
    uint16_t *xp = malloc(sizeof(uint16_t) * (size_t)(M * (K / 64 * 64) + 1));
    float *yf = malloc(sizeof(float) * (size_t)(M * N));
    if (!xp || !yf) {
        free(xp);
        free(yf);
        return -1;
    }
    fp8_gemm_bf16(x, ldx, w, ldw, S, lds, row_block, row_off, yf, N, M, N, K, xp, nthreads);
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t n = 0; n < N; n++) y[m * ldy + n] = f32_to_bf16(yf[m * N + n]);
    free(xp);
    free(yf);
    return 0;
}

static int cpu_bf16(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512bf16");
}

static int cpu_ok(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static int cpu_ok(void) { return 0; }
static int cpu_bf16(void) { return 0; }
#endif

PyDoc_STRVAR(available_doc, "available() -> bool: the kernels can run on this CPU (x86-64 with AVX2, FMA, F16C).");

static PyObject *available(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_ok());
}

PyDoc_STRVAR(gemm_doc,
             "gemm(x, ldx, w, ldw, s, lds, row_block, row_off, col_off, y, ldy, m, n, k) -> None\n\n"
             "y[m, n] = x[m, k] @ W^T (fp32 x, y by address and leading dimension in elements) for an\n"
             "e4m3 weight W [n, k] (bytes, leading dimension ldw) with fp32 scales s (leading dimension\n"
             "lds): W[i, j] = e4m3(w[i, j]) * s[(i + row_off) / row_block, (j + col_off) / 128].\n"
             "The caller guarantees the buffers; the GIL is released while it runs.");

static PyObject *gemm(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, ldw, ps, lds, rb, roff, coff, py, ldy, M, N, K;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnnn", &px, &ldx, &pw, &ldw, &ps, &lds, &rb, &roff, &coff, &py, &ldy,
                          &M, &N, &K))
        return NULL;
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N || ldw < K || rb < 1 || roff < 0 || roff >= rb ||
        coff < 0 || coff >= 128 || lds < (K + coff + 127) / 128 || !px || !pw || !ps || !py) {
        PyErr_SetString(PyExc_ValueError, "fp8 gemm: negative size, bad block offsets, leading dimension too "
                                          "small or null buffer");
        return NULL;
    }
#ifdef AFD_X86
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "fp8 gemm: this CPU lacks AVX2/FMA/F16C");
        return NULL;
    }
    if (M == 0 || N == 0)
        Py_RETURN_NONE;
    float *xs = malloc(sizeof(float) * (size_t)(M * (K ? K : 1)) * (size_t)max_threads());
    if (!xs)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    fp8_gemm((const float *)px, ldx, (const uint8_t *)pw, ldw, (const float *)ps, lds, rb, roff, coff,
             (float *)py, ldy, M, N, K, xs);
    Py_END_ALLOW_THREADS
    free(xs);
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "fp8 gemm: built without the x86-64 kernels");
    return NULL;
#endif
}

PyDoc_STRVAR(bf16_available_doc, "bf16_available() -> bool: gemm_bf16 can run here (AVX512-BF16 and VBMI).");

static PyObject *bf16_available(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_ok() && cpu_bf16());
}

PyDoc_STRVAR(gemm_bf16_doc,
             "gemm_bf16(x, ldx, w, ldw, s, lds, row_block, row_off, y, ldy, m, n, k) -> None\n\n"
             "`gemm` for bf16 x and y (column offset 0) with AVX512-BF16: the weights are widened to\n"
             "bf16 (exact) and multiplied with x by vdpbf16ps, fp32 accumulation, one scale per block.");

static PyObject *gemm_bf16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, ldw, ps, lds, rb, roff, py, ldy, M, N, K;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnn", &px, &ldx, &pw, &ldw, &ps, &lds, &rb, &roff, &py, &ldy, &M, &N, &K))
        return NULL;
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N || ldw < K || rb < 1 || roff < 0 || roff >= rb ||
        lds < (K + 127) / 128 || !px || !pw || !ps || !py) {
        PyErr_SetString(PyExc_ValueError, "fp8 gemm_bf16: negative size, bad block offset, leading dimension "
                                          "too small or null buffer");
        return NULL;
    }
    if (!cpu_ok() || !cpu_bf16()) {
        PyErr_SetString(PyExc_RuntimeError, "fp8 gemm_bf16: this CPU lacks AVX512-BF16/VBMI");
        return NULL;
    }
#ifdef AFD_X86
    int rc;
    const int nthreads = max_threads();
    Py_BEGIN_ALLOW_THREADS
    rc = afd_fp8_gemm_bf16((const uint16_t *)px, ldx, (const uint8_t *)pw, ldw, (const float *)ps, lds, rb, roff,
                           (uint16_t *)py, ldy, M, N, K, nthreads);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gemm_bf16_address_doc,
             "gemm_bf16_address() -> int\n\n"
             "The address of the C function behind `gemm_bf16` (int afd_fp8_gemm_bf16(x, ldx, w, ldw, s, lds,\n"
             "row_block, row_off, y, ldy, m, n, k, nthreads)), for afdserve._native's MoE; 0 where this CPU\n"
             "or build has no AVX512-BF16 kernel.");

static PyObject *gemm_bf16_address(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
#ifdef AFD_X86
    if (cpu_ok() && cpu_bf16()) return PyLong_FromVoidPtr((void *)afd_fp8_gemm_bf16);
#endif
    return PyLong_FromLong(0);
}

PyDoc_STRVAR(dequantize_doc,
             "dequantize(w, ldw, s, lds, row_block, row_off, col_off, out, ldo, n, k) -> None\n\n"
             "out[n, k] (fp32, leading dimension ldo) = the e4m3 weight W of `gemm`, dequantized.\n"
             "The caller guarantees the buffers; the GIL is released while it runs.");

static PyObject *dequantize(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pw, ldw, ps, lds, rb, roff, coff, po, ldo, N, K;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnn", &pw, &ldw, &ps, &lds, &rb, &roff, &coff, &po, &ldo, &N, &K))
        return NULL;
    if (N < 0 || K < 0 || ldw < K || ldo < K || rb < 1 || roff < 0 || roff >= rb || coff < 0 || coff >= 128 ||
        lds < (K + coff + 127) / 128 || !pw || !ps || !po) {
        PyErr_SetString(PyExc_ValueError, "fp8 dequantize: negative size, bad block offsets, leading dimension "
                                          "too small or null buffer");
        return NULL;
    }
#ifdef AFD_X86
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "fp8 dequantize: this CPU lacks AVX2/FMA/F16C");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    dequant((const uint8_t *)pw, ldw, (const float *)ps, lds, rb, roff, coff, (float *)po, ldo, N, K);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "fp8 dequantize: built without the x86-64 kernels");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"gemm", gemm, METH_VARARGS, gemm_doc},
    {"bf16_available", bf16_available, METH_NOARGS, bf16_available_doc},
    {"gemm_bf16", gemm_bf16, METH_VARARGS, gemm_bf16_doc},
    {"gemm_bf16_address", gemm_bf16_address, METH_NOARGS, gemm_bf16_address_doc},
    {"dequantize", dequantize, METH_VARARGS, dequantize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "afdserve._fp8",
    "GEMMs for few rows over block-scaled FP8 (e4m3) weights (see afdserve/native/fp8_kernels.c)",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fp8(void)
{
    build_lut();
    return PyModule_Create(&module);
}
