/*
 * afdserve._native.moe_bf16: a MoE layer's routed experts on bf16 activations in one call, over bf16
 * weights or block-scaled FP8 (e4m3) ones.
 *
 * The Python MoE (afdserve/model/layers.py, MoE.forward) groups the (token, slot) pairs by expert
 * with ~10 torch operations, then runs, per expert hit, a gather, two GEMMs, silu * up and a
 * scatter, and finally weights and sums the k slots of every token: at batch 32 and 16 experts,
 * ~100 torch operations and 32 GEMM calls per layer, most of the layer's time being overhead.
 * This file does the same work in C with the same kernels:
 *   1. group the pairs whose expert is local, in (token, slot) order within each expert;
 *   2. per expert with n pairs: gather the n rows of x, gate|up GEMM, silu * up, down GEMM, each
 *      GEMM on the instruction set the caller's kernel policy picks for n rows (afd_bgemm splits
 *      its outputs over the threads);
 *   3. per token: y = bf16(sum over slots j, in order, of bf16(out_j * bf16(w_j))), slots whose
 *      expert is not local adding nothing;
 *   4. optionally the shared expert: y = bf16(y + shared(x)), as Step3DecoderLayer.ffn_half adds it.
 * Every rounding is the Python path's, and each GEMM row is computed independently of the other
 * rows, so the result is bitwise that of MoE.forward under the same policy (tests/test_kernels.py).
 * FP8 weights go through afdserve._fp8's GEMM (fp8_kernels.c, afd_fp8_gemm_bf16), whose address the
 * caller passes: the very function behind that extension's `gemm_bf16`, which the Python path runs
 * (tests/test_fp8.py).
 * An expert with more pairs than the policy sends to the native kernels makes the call return
 * False before anything is computed; the caller then runs the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "afd_native.h"

/* int afd_fp8_gemm_bf16(x, ldx, w, ldw, s, lds, row_block, row_off, y, ldy, M, N, K, nthreads) of
   afdserve._fp8 (fp8_kernels.c), passed by address: the product of bf16 rows with e4m3 weights. */
typedef int (*fp8_gemm_fn)(const uint16_t *, ptrdiff_t, const uint8_t *, ptrdiff_t, const float *, ptrdiff_t,
                           ptrdiff_t, ptrdiff_t, uint16_t *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);

typedef struct {
    int dp_rows, packed_rows, native_rows, small_isa;  /* the kernel policy's bf16 [out, in] choices */
    fp8_gemm_fn fp8;                                   /* e4m3 weights: this kernel, up to fp8_rows rows */
    ptrdiff_t fp8_rows;
} moe_policy;

/* One weight matrix [N, K] per expert (or the shared expert's only one), row-major with leading
   dimension ldw: bf16 (s NULL), or e4m3 codes with fp32 scales (leading dimension lds), one per
   (row_block rows, 128 columns), rows offset by row_off in that grid; expert e's matrix and scales
   start e * w_stride weights and e * s_stride scales further. */
typedef struct {
    const void *w;
    ptrdiff_t ldw, w_stride;
    const float *s;
    ptrdiff_t lds, s_stride, row_block, row_off;
} moe_mat;

/* The policy's instruction set for n rows and reduction length K; 0 where no native kernel runs. */
static int isa_for(const moe_policy *p, ptrdiff_t n, ptrdiff_t K)
{
    if (p->dp_rows < n && n <= p->packed_rows && K % 2 == 0) return AFD_ISA_AVX512BF16_PACKED;
    if (n > p->native_rows) return 0;
    return n <= p->dp_rows ? p->small_isa : AFD_ISA_AVX2;
}

/* Whether this call can run a product of n rows with reduction length K over matrix m. */
static int takes(const moe_policy *p, const moe_mat *m, ptrdiff_t n, ptrdiff_t K)
{
    return m->s ? n <= p->fp8_rows : isa_for(p, n, K) != 0;
}

/* y [n, N] = x [n, K] @ (expert e's matrix m)^T; nonzero on failure. */
static int mat_gemm(const moe_policy *p, const uint16_t *x, const moe_mat *m, ptrdiff_t e, uint16_t *y,
                    ptrdiff_t n, ptrdiff_t N, ptrdiff_t K, int nthreads)
{
    if (m->s)
        return p->fp8(x, K, (const uint8_t *)m->w + e * m->w_stride, m->ldw, m->s + e * m->s_stride, m->lds,
                      m->row_block, m->row_off, y, N, n, N, K, nthreads);
    return afd_bgemm(x, K, (const uint16_t *)m->w + e * m->w_stride, m->ldw, y, N, n, N, K, 0, isa_for(p, n, K),
                     nthreads);
}

typedef struct {
    const uint16_t *x;                     /* x [T, H] */
    moe_mat gate_up, down;                 /* [E, 2W, H], [E, H, W] */
    moe_mat s_gate_up, s_down;             /* the shared expert: [2Ws, H], [H, Ws]; s_gate_up.w NULL: none */
    ptrdiff_t Ws;
    const int64_t *ids;                    /* [T, k] global expert ids */
    const float *weights;                  /* [T, k] */
    uint16_t *y;                           /* [T, H] */
    ptrdiff_t T, H, W, k, first, E;
} moe_args;

/* oe [n, H] = down(silu(gate(xe)) * up(xe)) for xe [n, H]: expert e of gate_up / down, a SwiGLU of
   width W; gu, act: scratch. */
static int swiglu(const moe_policy *p, const uint16_t *xe, ptrdiff_t n, ptrdiff_t H, ptrdiff_t W,
                  const moe_mat *gate_up, const moe_mat *down, ptrdiff_t e, uint16_t *gu, uint16_t *act,
                  uint16_t *oe, int nthreads)
{
    if (mat_gemm(p, xe, gate_up, e, gu, n, 2 * W, H, nthreads)) return -1;
    for (ptrdiff_t r = 0; r < n; r++) afd_silu_mul_row(gu + r * 2 * W, act + r * W, W, 1);
    return mat_gemm(p, act, down, e, oe, n, H, W, nthreads) ? -1 : 0;
}

/* Expert e's n pairs (flat indices `rows`) through its SwiGLU into out[pair]. */
static int run_expert(const moe_args *a, const moe_policy *p, ptrdiff_t e, const ptrdiff_t *rows, ptrdiff_t n,
                      uint16_t *buf, uint16_t *out, int nthreads)
{
    const ptrdiff_t H = a->H, W = a->W;
    uint16_t *xe = buf, *gu = xe + n * H, *act = gu + n * 2 * W, *oe = act + n * W;
    for (ptrdiff_t r = 0; r < n; r++) memcpy(xe + r * H, a->x + (rows[r] / a->k) * H, sizeof(uint16_t) * (size_t)H);
    if (swiglu(p, xe, n, H, W, &a->gate_up, &a->down, e, gu, act, oe, nthreads)) return -1;
    for (ptrdiff_t r = 0; r < n; r++) memcpy(out + rows[r] * H, oe + r * H, sizeof(uint16_t) * (size_t)H);
    return 0;
}

#ifdef AFD_X86
/* y[0:n] = bf16(y + o), eight at a time; returns where the scalar tail starts. */
TGT static ptrdiff_t add_bf16x8(uint16_t *y, const uint16_t *o, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        afd_store_bf16x8(y + i, afd_round_bf16_ps(_mm256_add_ps(afd_bf16x8_to_ps(y + i), afd_bf16x8_to_ps(o + i))));
    return i;
}
#endif

/* os [T, H] = the shared expert of every token; buf: scratch. */
static int run_shared(const moe_args *a, const moe_policy *p, uint16_t *buf, uint16_t *os, int nthreads)
{
    uint16_t *gu = buf, *act = gu + a->T * 2 * a->Ws;
    return swiglu(p, a->x, a->T, a->H, a->Ws, &a->s_gate_up, &a->s_down, 0, gu, act, os, nthreads);
}

/* y = bf16(y + os), as `y + shared(x)` rounds it. */
static void add_shared(const moe_args *a, const uint16_t *os)
{
    const ptrdiff_t n = a->T * a->H;
    ptrdiff_t i = 0;
#ifdef AFD_X86
    i = add_bf16x8(a->y, os, n);
#endif
    for (; i < n; i++) a->y[i] = afd_f32_to_bf16(afd_bf16_to_f32(a->y[i]) + afd_bf16_to_f32(os[i]));
}

/* y[t, h0:] = bf16(sum_j bf16(out[t, j] * bf16(w[t, j]))) over the local slots of token t. */
static void combine_tail(const moe_args *a, const uint16_t *out, const char *local, ptrdiff_t t, ptrdiff_t h0)
{
    const ptrdiff_t H = a->H, k = a->k;
    for (ptrdiff_t h = h0; h < H; h++) {
        float s = 0.f;
        for (ptrdiff_t j = 0; j < k; j++)
            if (local[t * k + j]) {
                const float w = afd_bf16_to_f32(afd_f32_to_bf16(a->weights[t * k + j]));
                s += afd_bf16_to_f32(afd_f32_to_bf16(afd_bf16_to_f32(out[(t * k + j) * H + h]) * w));
            }
        a->y[t * H + h] = afd_f32_to_bf16(s);
    }
}

#ifdef AFD_X86
/* The same sums eight outputs at a time (the same roundings, the same order); returns where the
   scalar tail starts. */
TGT static ptrdiff_t combine_x8(const moe_args *a, const uint16_t *out, const char *local, ptrdiff_t t)
{
    const ptrdiff_t H = a->H, k = a->k;
    ptrdiff_t h = 0;
    for (; h + 8 <= H; h += 8) {
        __m256 s = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < k; j++)
            if (local[t * k + j]) {
                const __m256 w = _mm256_set1_ps(afd_bf16_to_f32(afd_f32_to_bf16(a->weights[t * k + j])));
                s = _mm256_add_ps(s, afd_round_bf16_ps(_mm256_mul_ps(afd_bf16x8_to_ps(out + (t * k + j) * H + h), w)));
            }
        afd_store_bf16x8(a->y + t * H + h, afd_round_bf16_ps(s));
    }
    return h;
}
#endif

static void combine(const moe_args *a, const uint16_t *out, const char *local, int nthreads)
{
    const int nt = a->T * a->H >= (1 << 17) * nthreads ? nthreads : 1;   /* prefill-sized only */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (ptrdiff_t t = 0; t < a->T; t++) {
        ptrdiff_t h0 = 0;
#ifdef AFD_X86
        h0 = combine_x8(a, out, local, t);
#endif
        combine_tail(a, out, local, t, h0);
    }
}

/* 1 done, 0 not handled (an expert's row count outside the native kernels), -1 out of memory. */
static int moe_run(const moe_args *a, const moe_policy *p, int nthreads)
{
    const ptrdiff_t pairs = a->T * a->k;
    ptrdiff_t *count = calloc((size_t)a->E + 1, sizeof(ptrdiff_t)), *order = malloc(sizeof(ptrdiff_t) * (size_t)(pairs + 1));
    char *local = malloc((size_t)pairs + 1);
    uint16_t *out = NULL, *buf = NULL, *os = NULL;
    int rc = -1;
    if (!count || !order || !local) goto done;
    ptrdiff_t most = 0;
    for (ptrdiff_t f = 0; f < pairs; f++) {
        const int64_t e = a->ids[f] - a->first;
        local[f] = e >= 0 && e < a->E;
        if (local[f] && ++count[e] > most) most = count[e];
    }
    rc = 0;
    for (ptrdiff_t e = 0; e < a->E; e++)
        if (count[e] && (!takes(p, &a->gate_up, count[e], a->H) || !takes(p, &a->down, count[e], a->W))) goto done;
    if (a->s_gate_up.w && (!takes(p, &a->s_gate_up, a->T, a->H) || !takes(p, &a->s_down, a->T, a->Ws))) goto done;
    rc = -1;
    const int shared = a->s_gate_up.w != NULL;
    int items = shared;
    for (ptrdiff_t e = 0; e < a->E; e++) items += count[e] > 0;
    /* Enough work items (experts hit, and the shared expert) for every thread: whole items per thread
       (one team for the layer, each thread streaming its own experts' weights; the shared expert,
       usually the most rows, first); else each GEMM's outputs split over the threads. Either way
       every output is computed by the same instructions: the same bits. */
    const int per_expert = nthreads > 1 && items >= 2 * nthreads;
    const int bufs = per_expert ? nthreads : 1;
    const ptrdiff_t expert_buf = most * (2 * a->H + 3 * a->W), shared_buf = shared ? a->T * 3 * a->Ws : 0;
    const ptrdiff_t per_buf = expert_buf > shared_buf ? expert_buf : shared_buf;
    out = malloc(sizeof(uint16_t) * (size_t)(pairs * a->H + 1));
    buf = malloc(sizeof(uint16_t) * (size_t)(per_buf * bufs + 1));
    os = shared ? malloc(sizeof(uint16_t) * (size_t)(a->T * a->H + 1)) : NULL;
    if (!out || !buf || (shared && !os)) goto done;
    ptrdiff_t start = 0;                                /* counting sort: pairs grouped by expert */
    for (ptrdiff_t e = 0; e < a->E; e++) {
        const ptrdiff_t c = count[e];
        count[e] = start;
        start += c;
    }
    for (ptrdiff_t f = 0; f < pairs; f++)
        if (local[f]) order[count[a->ids[f] - a->first]++] = f;   /* count[e]: now the end of e's pairs */
    int failed = 0;
    if (per_expert) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)
        for (ptrdiff_t i = 0; i < a->E + shared; i++) {
            uint16_t *tb = buf + per_buf * afd_thread_num();
            const ptrdiff_t e = i - shared, s = e > 0 ? count[e - 1] : 0;
            if (e < 0)
                failed |= run_shared(a, p, tb, os, 1);
            else if (count[e] > s)
                failed |= run_expert(a, p, e, order + s, count[e] - s, tb, out, 1);
        }
    } else {                           /* not inside a team: afd_bgemm's own team is the top level */
        for (ptrdiff_t e = 0, s = 0; e < a->E && !failed; s = count[e++])
            if (count[e] > s) failed = run_expert(a, p, e, order + s, count[e] - s, buf, out, nthreads);
        if (shared && !failed) failed = run_shared(a, p, buf, os, nthreads);
    }
    if (failed) goto done;
    combine(a, out, local, nthreads);
    if (shared) add_shared(a, os);
    rc = 1;
done:
    free(count);
    free(order);
    free(local);
    free(out);
    free(buf);
    free(os);
    return rc;
}

PyDoc_STRVAR(moe_bf16_doc,
             "moe_bf16(x, T, H, ids, weights, k, first, E, gate_up, down, W, shared_gate_up, shared_down, Ws,\n"
             "         y, dp_rows, packed_rows, native_rows, small_isa, fp8_gemm, fp8_rows, nthreads) -> bool\n\n"
             "The routed experts of a MoE layer on bf16 activations (buffers by address, contiguous): x [T, H];\n"
             "ids int64 / weights fp32 [T, k] (global expert ids, local ones are first..first+E-1); y [T, H].\n"
             "Each matrix is a tuple (w, ldw, w_stride, s, lds, s_stride, row_block, row_off): w the bf16\n"
             "weights (s = 0), or e4m3 codes with fp32 block scales s (rows offset by row_off on the grid of\n"
             "row_block x 128); ld*: leading dimensions, *_stride: from one expert to the next (elements);\n"
             "gate_up [E, 2W, H], down [E, H, W]; plus, unless\n"
             "shared_gate_up's w is 0, the shared expert [2Ws, H], [H, Ws] of every token. bf16 GEMMs follow\n"
             "the kernel policy's row limits; e4m3 ones run fp8_gemm (afdserve._fp8.gemm_bf16_address()) up to\n"
             "fp8_rows rows. False (nothing written) where a product has more rows than that; the GIL is\n"
             "released.");

static int parse_mat(PyObject *t, moe_mat *m)
{
    Py_ssize_t w, ldw, w_stride, s, lds, s_stride, rb, roff;
    if (!PyArg_ParseTuple(t, "nnnnnnnn", &w, &ldw, &w_stride, &s, &lds, &s_stride, &rb, &roff)) return -1;
    if (ldw < 0 || w_stride < 0 || (s && (rb < 1 || roff < 0 || roff >= rb || lds < 1 || s_stride < 0))) {
        PyErr_SetString(PyExc_ValueError, "moe_bf16: bad weight or fp8 scale layout");
        return -1;
    }
    *m = (moe_mat){(const void *)w, ldw, w_stride, (const float *)s, lds, s_stride, rb, roff};
    return 0;
}

static PyObject *moe_bf16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, T, H, pids, pw, k, first, E, W, Ws, py, pfp8, fp8_rows;
    PyObject *mats[4];
    moe_policy p;
    moe_args a;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnnnnnnO!O!nO!O!nniiiinni", &px, &T, &H, &pids, &pw, &k, &first, &E,
                          &PyTuple_Type, &mats[0], &PyTuple_Type, &mats[1], &W, &PyTuple_Type, &mats[2],
                          &PyTuple_Type, &mats[3], &Ws, &py, &p.dp_rows, &p.packed_rows, &p.native_rows,
                          &p.small_isa, &pfp8, &fp8_rows, &nthreads))
        return NULL;
    if (parse_mat(mats[0], &a.gate_up) || parse_mat(mats[1], &a.down) || parse_mat(mats[2], &a.s_gate_up) ||
        parse_mat(mats[3], &a.s_down))
        return NULL;
    const int any_fp8 = a.gate_up.s || a.down.s || a.s_gate_up.s || a.s_down.s;
    if (T < 0 || H <= 0 || k <= 0 || E < 0 || W <= 0 || nthreads < 1 || !px || !pids || !pw || !a.gate_up.w ||
        !a.down.w || !py || (a.s_gate_up.w && (!a.s_down.w || Ws <= 0)) || (any_fp8 && !pfp8)) {
        PyErr_SetString(PyExc_ValueError, "moe_bf16: bad sizes or null buffer (or fp8 weights without fp8_gemm)");
        return NULL;
    }
    if (p.small_isa != AFD_ISA_AVX2 && p.small_isa != AFD_ISA_AVX512BF16) {
        PyErr_SetString(PyExc_ValueError, "moe_bf16: small_isa must be 1 (AVX2) or 2 (AVX512-BF16)");
        return NULL;
    }
    if ((p.small_isa == AFD_ISA_AVX512BF16 || p.packed_rows > p.dp_rows || any_fp8) && !afd_cpu_avx512bf16()) {
        PyErr_SetString(PyExc_ValueError, "moe_bf16: this CPU lacks AVX512-BF16");
        return NULL;
    }
    p.fp8 = (fp8_gemm_fn)pfp8;
    p.fp8_rows = fp8_rows;
    a.x = (const uint16_t *)px;
    a.Ws = Ws;
    a.ids = (const int64_t *)pids;
    a.weights = (const float *)pw;
    a.y = (uint16_t *)py;
    a.T = T, a.H = H, a.W = W, a.k = k, a.first = first, a.E = E;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = moe_run(&a, &p, nthreads);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc);
}

PyMethodDef afd_moe_methods[] = {
    {"moe_bf16", moe_bf16, METH_VARARGS, moe_bf16_doc},
    {NULL, NULL, 0, NULL},
};
