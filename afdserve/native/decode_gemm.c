/*
 * afdserve._native: fp32 GEMMs for decode-shaped problems (few rows, many weights) on x86-64 CPUs
 * with AVX2 + FMA.
 *
 *     y[M, N] = x[M, K] @ W^T        W given as [N, K] (checkpoint layout) or [K, N] (transposed)
 *
 * A decode step multiplies 1-32 rows by every weight matrix once, so the time is the time to
 * stream the weights from memory. General BLAS kernels pack panels of W for reuse that small M
 * never gets, and reach a third to a half of the streaming rate at 2-8 rows. The two kernels here
 * read every weight byte once, and keep the rows of x and the partial outputs in registers or the
 * first cache levels:
 *
 *  - [N, K] ("dot" form): a block of NR consecutive weight rows is multiplied with every group of
 *    up to 4 rows of x, NR x MR dot products in registers; the next block is prefetched while the
 *    first group runs, later groups find the block in L1.
 *  - [K, N] ("axpy" form): for a tile of the outputs (sized so y's tile stays in L1/L2), KB rows
 *    of W at a time are streamed along N, each as one long contiguous run, and accumulated into y.
 *
 * Benchmarks (benchmarks/kernel_bench.py) pick which rows and layouts go here; the Python side
 * (afdserve/model/kernels.py) checks shapes, strides, dtype and device before calling `sgemm`.
 * Summation order differs from BLAS, so results equal F.linear up to rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define AFD_X86 1
#include <immintrin.h>
#define TGT __attribute__((target("avx2,fma")))

TGT static inline float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* ---- [N, K] layout: y[m, n] = dot(x[m, :], w[n, :]) ------------------------------------------ */

/* MR rows of x times NR consecutive rows of w; `pf`: prefetch the NR rows that follow. */
#define DEFINE_DOT(MR, NR)                                                                          \
    TGT static void dot_##MR##_##NR(const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw,  \
                                    float *y, ptrdiff_t ldy, ptrdiff_t K, int pf)                  \
    {                                                                                               \
        __m256 acc[MR][NR];                                                                         \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) acc[m][n] = _mm256_setzero_ps();                           \
        ptrdiff_t k = 0;                                                                            \
        for (; k + 8 <= K; k += 8) {                                                                \
            __m256 wv[NR];                                                                          \
            for (int n = 0; n < NR; n++) wv[n] = _mm256_loadu_ps(w + n * ldw + k);                  \
            if (pf && (k & 15) == 0)                                                                \
                for (int n = 0; n < NR; n++) __builtin_prefetch(w + (NR + n) * ldw + k, 0, 2);      \
            for (int m = 0; m < MR; m++) {                                                          \
                __m256 xv = _mm256_loadu_ps(x + m * ldx + k);                                       \
                for (int n = 0; n < NR; n++) acc[m][n] = _mm256_fmadd_ps(wv[n], xv, acc[m][n]);     \
            }                                                                                       \
        }                                                                                           \
        for (int m = 0; m < MR; m++)                                                                \
            for (int n = 0; n < NR; n++) {                                                          \
                float s = hsum8(acc[m][n]);                                                         \
                for (ptrdiff_t kk = k; kk < K; kk++) s += x[m * ldx + kk] * w[n * ldw + kk];        \
                y[m * ldy + n] = s;                                                                 \
            }                                                                                       \
    }

DEFINE_DOT(1, 8)
DEFINE_DOT(1, 4) DEFINE_DOT(2, 4) DEFINE_DOT(3, 4)
DEFINE_DOT(1, 3) DEFINE_DOT(2, 3) DEFINE_DOT(3, 3) DEFINE_DOT(4, 3)
DEFINE_DOT(1, 1) DEFINE_DOT(2, 1) DEFINE_DOT(3, 1) DEFINE_DOT(4, 1)

typedef void (*dot_fn)(const float *, ptrdiff_t, const float *, ptrdiff_t, float *, ptrdiff_t,
                       ptrdiff_t, int);
static const dot_fn dot_nr4[4] = {0, dot_1_4, dot_2_4, dot_3_4};
static const dot_fn dot_nr3[5] = {0, dot_1_3, dot_2_3, dot_3_3, dot_4_3};
static const dot_fn dot_nr1[5] = {0, dot_1_1, dot_2_1, dot_3_1, dot_4_1};

TGT static void gemm_dot(const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *y,
                         ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    ptrdiff_t n = 0;
    if (M == 1) {                       /* one row: 8 weight rows per block, hardware prefetch */
        for (; n + 8 <= N; n += 8) dot_1_8(x, ldx, w + n * ldw, ldw, y + n, ldy, K, 0);
    } else {
        /* 2-3 rows: one group, 4 weight rows per block; 4+ rows: groups of 4 rows over 3 weight rows */
        const int NR = M <= 3 ? 4 : 3;
        const dot_fn *tab = NR == 4 ? dot_nr4 : dot_nr3;
        for (; n + NR <= N; n += NR) {
            int pf = n + 2 * NR <= N;
            for (ptrdiff_t m = 0; m < M;) {
                int mr = M - m >= 4 ? 4 : (int)(M - m);
                tab[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, pf && m == 0);
                m += mr;
            }
        }
    }
    for (; n < N; n++)
        for (ptrdiff_t m = 0; m < M;) {
            int mr = M - m >= 4 ? 4 : (int)(M - m);
            dot_nr1[mr](x + m * ldx, ldx, w + n * ldw, ldw, y + m * ldy + n, ldy, K, 0);
            m += mr;
        }
}

/* ---- [K, N] layout: y[m, :] += x[m, k] * wt[k, :] -------------------------------------------- */

#define KB 8                      /* rows of wt streamed together */
#define Y_TILE_BYTES (64 * 1024)  /* the outputs' tile, all rows of x together */

/* y[0:MR, 0:nt] (= or +=) x[0:MR, 0:KB] @ wt[0:KB, 0:nt] */
#define DEFINE_AXPY(MR)                                                                             \
    TGT static void axpy_##MR(const float *x, ptrdiff_t ldx, const float *wt, ptrdiff_t ldw,       \
                              float *y, ptrdiff_t ldy, ptrdiff_t nt, int first)                     \
    {                                                                                               \
        __m256 b[MR][KB];                                                                           \
        for (int m = 0; m < MR; m++)                                                                \
            for (int j = 0; j < KB; j++) b[m][j] = _mm256_broadcast_ss(x + m * ldx + j);            \
        ptrdiff_t v = 0;                                                                            \
        for (; v + 8 <= nt; v += 8) {                                                               \
            __m256 wv[KB];                                                                          \
            for (int j = 0; j < KB; j++) wv[j] = _mm256_loadu_ps(wt + j * ldw + v);                 \
            for (int m = 0; m < MR; m++) {                                                          \
                __m256 a = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + m * ldy + v);          \
                for (int j = 0; j < KB; j++) a = _mm256_fmadd_ps(wv[j], b[m][j], a);                \
                _mm256_storeu_ps(y + m * ldy + v, a);                                               \
            }                                                                                       \
        }                                                                                           \
        for (; v < nt; v++)                                                                         \
            for (int m = 0; m < MR; m++) {                                                          \
                float s = first ? 0.f : y[m * ldy + v];                                             \
                for (int j = 0; j < KB; j++) s += x[m * ldx + j] * wt[j * ldw + v];                 \
                y[m * ldy + v] = s;                                                                 \
            }                                                                                       \
    }

DEFINE_AXPY(1) DEFINE_AXPY(2)

/* the last K % KB rows of wt, one at a time */
static void axpy_rows(const float *x, ptrdiff_t ldx, const float *wt, ptrdiff_t ldw, float *y,
                      ptrdiff_t ldy, ptrdiff_t M, ptrdiff_t nt, ptrdiff_t rows, int first)
{
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t v = 0; v < nt; v++) {
            float s = first ? 0.f : y[m * ldy + v];
            for (ptrdiff_t j = 0; j < rows; j++) s += x[m * ldx + j] * wt[j * ldw + v];
            y[m * ldy + v] = s;
        }
}

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
        if (k0 < K) axpy_rows(x + k0, ldx, wt + k0 * ldw + n0, ldw, y + n0, ldy, M, nt, K - k0, k0 == 0);
    }
}

static int cpu_ok(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int cpu_ok(void) { return 0; }
#endif

PyDoc_STRVAR(available_doc, "available() -> bool: the kernels can run on this CPU (x86-64 with AVX2 and FMA).");

static PyObject *available(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_ok());
}

PyDoc_STRVAR(sgemm_doc,
             "sgemm(x, ldx, w, ldw, y, ldy, m, n, k, transposed) -> None\n\n"
             "y[m, n] = x[m, k] @ W^T for fp32 row-major buffers given by address and leading\n"
             "dimension (in elements). W is [n, k] (ldw >= k), or [k, n] when `transposed`\n"
             "(ldw >= n). The caller guarantees the buffers; the GIL is released while it runs.");

static PyObject *sgemm(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, ldw, py, ldy, M, N, K;
    int transposed;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnp", &px, &ldx, &pw, &ldw, &py, &ldy, &M, &N, &K, &transposed))
        return NULL;
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N || ldw < (transposed ? N : K) || !px || !pw || !py) {
        PyErr_SetString(PyExc_ValueError, "sgemm: negative size, leading dimension too small or null buffer");
        return NULL;
    }
#ifdef AFD_X86
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "sgemm: this CPU lacks AVX2/FMA");
        return NULL;
    }
    if (M > 0 && N > 0) {
        const float *x = (const float *)px, *w = (const float *)pw;
        float *y = (float *)py;
        Py_BEGIN_ALLOW_THREADS
        if (K == 0)
            for (Py_ssize_t m = 0; m < M; m++)
                for (Py_ssize_t n = 0; n < N; n++) y[m * ldy + n] = 0.f;
        else if (transposed)
            gemm_axpy(x, ldx, w, ldw, y, ldy, M, N, K);
        else
            gemm_dot(x, ldx, w, ldw, y, ldy, M, N, K);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "sgemm: built without the x86-64 kernels");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"sgemm", sgemm, METH_VARARGS, sgemm_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "afdserve._native",
    "fp32 GEMM kernels for decode-shaped problems (see afdserve/native/decode_gemm.c)", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
