/*
 * afdserve._native's element-wise kernels of a decode step: RMSNorm, rotary embedding and SwiGLU's
 * silu(gate) * up, each one pass over its rows instead of the 6-8 torch operations (and
 * temporaries) the same formula takes at the Python level. A batch-1 decode step of a 12-layer
 * model runs ~100 of them, and there a torch operation costs more than the arithmetic it does.
 *
 * Every kernel rounds where the torch formula it replaces rounds (afdserve/model/layers.py):
 *  - rms_norm (bf16): r = 1/sqrt(mean(x^2) + eps) in fp32; t = bf16(x * r); y = bf16(t * w).
 *  - rope (bf16 or fp32): y = x * cos + rotate_half(x) * sin, each product and the sum in fp32,
 *    one rounding to the output dtype: the same operations in the same order as torch's, so the
 *    result is bitwise equal (this file is compiled as ISO C, which keeps products and sums
 *    apart: no fused multiply-add).
 *  - silu_mul (bf16 or fp32): s = silu(g) rounded to the dtype, y = s * u rounded.
 * The mean of squares and exp() may differ from torch's in the last fp32 bit (summation order,
 * libm vs torch's vectorised exp), so rms_norm and silu_mul equal torch's up to one rounding
 * (tests/test_kernels.py). Rows are split over up to `nthreads` OpenMP threads (prefill).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "afd_native.h"

#define ELEMS_PER_THREAD (1 << 17)  /* less work than this per thread (prefill-sized): not worth a fork */

static int row_threads(Py_ssize_t rows, Py_ssize_t width, int nthreads)
{
    Py_ssize_t most = rows * width / ELEMS_PER_THREAD;
    if (most < 1) most = 1;
    return nthreads < most ? (nthreads < 1 ? 1 : nthreads) : (int)most;
}

/* The first i < n with idx[i] outside 0..limit-1, or -1: indices are checked before any is used. */
static Py_ssize_t first_outside(const int64_t *idx, Py_ssize_t n, Py_ssize_t limit)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit) return i;
    return -1;
}

static inline float ld(const void *p, Py_ssize_t i, int bf16)
{
    return bf16 ? afd_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, Py_ssize_t i, float v, int bf16)
{
    if (bf16)
        ((uint16_t *)p)[i] = afd_f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* bf16 rounding of an fp32 value, as a float (what a bf16 tensor holds) */
static inline float rb(float v) { return afd_bf16_to_f32(afd_f32_to_bf16(v)); }

#ifdef AFD_X86
TGT static void rms_norm_row(const uint16_t *x, const uint16_t *w, uint16_t *y, Py_ssize_t H, float eps)
{
    __m256 acc = _mm256_setzero_ps();
    Py_ssize_t i = 0;
    for (; i + 8 <= H; i += 8) {
        const __m256 v = afd_bf16x8_to_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = afd_hsum8(acc);
    for (Py_ssize_t j = i; j < H; j++) ss += afd_bf16_to_f32(x[j]) * afd_bf16_to_f32(x[j]);
    const float r = 1.f / sqrtf(ss / (float)H + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= H; i += 8) {
        const __m256 t = afd_round_bf16_ps(_mm256_mul_ps(afd_bf16x8_to_ps(x + i), rv));
        afd_store_bf16x8(y + i, afd_round_bf16_ps(_mm256_mul_ps(t, afd_bf16x8_to_ps(w + i))));
    }
    for (; i < H; i++) y[i] = afd_f32_to_bf16(rb(afd_bf16_to_f32(x[i]) * r) * afd_bf16_to_f32(w[i]));
}
#else
static void rms_norm_row(const uint16_t *x, const uint16_t *w, uint16_t *y, Py_ssize_t H, float eps)
{
    float ss = 0.f;
    for (Py_ssize_t i = 0; i < H; i++) ss += afd_bf16_to_f32(x[i]) * afd_bf16_to_f32(x[i]);
    const float r = 1.f / sqrtf(ss / (float)H + eps);
    for (Py_ssize_t i = 0; i < H; i++)
        y[i] = afd_f32_to_bf16(rb(afd_bf16_to_f32(x[i]) * r) * afd_bf16_to_f32(w[i]));
}
#endif

#ifdef AFD_X86
/* One bf16 head, pairs (i, i + half) eight at a time: the products and sums of the scalar loop
   below (no contraction into FMAs: the extension is built as ISO C), one rounding each. Returns
   the first i of the first half not done. */
TGT static Py_ssize_t rope_head_bf16x8(const uint16_t *x, uint16_t *y, Py_ssize_t half, const float *c,
                                       const float *s)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    Py_ssize_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 x1 = afd_bf16x8_to_ps(x + i), x2 = afd_bf16x8_to_ps(x + half + i);
        const __m256 lo = _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                        _mm256_mul_ps(_mm256_xor_ps(x2, sign), _mm256_loadu_ps(s + i)));
        const __m256 hi = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                        _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
        afd_store_bf16x8(y + i, afd_round_bf16_ps(lo));
        afd_store_bf16x8(y + half + i, afd_round_bf16_ps(hi));
    }
    return i;
}
#endif

static void rope_row(const void *x, void *y, Py_ssize_t heads, Py_ssize_t d, const float *c, const float *s,
                     int bf16)
{
    const Py_ssize_t half = d / 2;
    for (Py_ssize_t h = 0; h < heads; h++) {
        const Py_ssize_t o = h * d;
#ifdef AFD_X86
        if (bf16) {
            const Py_ssize_t done = rope_head_bf16x8((const uint16_t *)x + o, (uint16_t *)y + o, half, c, s);
            for (Py_ssize_t i = done; i < half; i++) {
                st(y, o + i, ld(x, o + i, 1) * c[i] + -ld(x, o + i + half, 1) * s[i], 1);
                st(y, o + half + i, ld(x, o + half + i, 1) * c[half + i] + ld(x, o + i, 1) * s[half + i], 1);
            }
            continue;
        }
#endif
        for (Py_ssize_t i = 0; i < d; i++) {
            const float rot = i < half ? -ld(x, o + i + half, bf16) : ld(x, o + i - half, bf16);
            const float a = ld(x, o + i, bf16) * c[i];
            const float b = rot * s[i];
            st(y, o + i, a + b, bf16);
        }
    }
}

#ifdef AFD_X86
/* bf16 rows eight at a time: exp by afd_exp_ps (within ~2 fp32 ulp of libm's; the bf16 rounding
   of silu(g) hides that almost always), the same two roundings. */
TGT static ptrdiff_t silu_mul_bf16x8(const uint16_t *gu, uint16_t *y, ptrdiff_t W)
{
    ptrdiff_t i = 0;
    for (; i + 8 <= W; i += 8) {
        const __m256 g = afd_bf16x8_to_ps(gu + i), u = afd_bf16x8_to_ps(gu + W + i);
        const __m256 e = afd_exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 sg = afd_round_bf16_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
        afd_store_bf16x8(y + i, afd_round_bf16_ps(_mm256_mul_ps(sg, u)));
    }
    return i;
}
#endif

void afd_silu_mul_row(const void *gu, void *y, ptrdiff_t W, int bf16)
{
    Py_ssize_t i = 0;
#ifdef AFD_X86
    if (bf16) i = silu_mul_bf16x8((const uint16_t *)gu, (uint16_t *)y, W);
#endif
    for (; i < W; i++) {
        const float g = ld(gu, i, bf16);
        float sg = g / (1.f + expf(-g));
        if (bf16) sg = rb(sg);
        st(y, i, sg * ld(gu, W + i, bf16), bf16);
    }
}

PyDoc_STRVAR(rms_norm_doc,
             "rms_norm(x, ldx, w, y, ldy, rows, hidden, eps, nthreads) -> None\n\n"
             "bf16 RMSNorm of `rows` rows of x (row stride ldx) into y (row stride ldy), weight w\n"
             "[hidden] bf16; fp32 math, rounded as afdserve.model.layers.RMSNorm. Buffers by address.");

static PyObject *rms_norm(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, pw, py, ldy, M, H;
    float eps;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnnnnnfi", &px, &ldx, &pw, &py, &ldy, &M, &H, &eps, &nthreads)) return NULL;
    if (M < 0 || H <= 0 || ldx < H || ldy < H || !px || !pw || !py) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: bad sizes or null buffer");
        return NULL;
    }
    const uint16_t *x = (const uint16_t *)px, *w = (const uint16_t *)pw;
    uint16_t *y = (uint16_t *)py;
    const int nt = row_threads(M, H, nthreads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (Py_ssize_t m = 0; m < M; m++) rms_norm_row(x + m * ldx, w, y + m * ldy, H, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(add_doc,
             "add(a, b, y, n, bf16) -> None\n\n"
             "y = a + b over n contiguous elements, bf16 (fp32 sum rounded once, as torch's add) or\n"
             "fp32: the residual adds of a decode step without a trip through torch's dispatcher.");

#ifdef AFD_X86
TGT static Py_ssize_t add_bf16x8(const uint16_t *a, const uint16_t *b, uint16_t *y, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        afd_store_bf16x8(y + i, afd_round_bf16_ps(_mm256_add_ps(afd_bf16x8_to_ps(a + i), afd_bf16x8_to_ps(b + i))));
    return i;
}
#endif

static PyObject *add(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pa, pb, py, n;
    int bf16;
    if (!PyArg_ParseTuple(args, "nnnnp", &pa, &pb, &py, &n, &bf16)) return NULL;
    if (n < 0 || (n && (!pa || !pb || !py))) {
        PyErr_SetString(PyExc_ValueError, "add: bad size or null buffer");
        return NULL;
    }
    Py_ssize_t i = 0;
#ifdef AFD_X86
    if (bf16) i = add_bf16x8((const uint16_t *)pa, (const uint16_t *)pb, (uint16_t *)py, n);
#endif
    for (; i < n; i++) st((void *)py, i, ld((const void *)pa, i, bf16) + ld((const void *)pb, i, bf16), bf16);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(route_doc,
             "route(logits, ld, tokens, experts, bf16, k, renormalize, weights, ids) -> None\n\n"
             "MoE routing of each token: softmax over its `experts` router logits (bf16 or fp32, row\n"
             "stride ld) in fp32, the k largest probabilities (descending; ties: the lower expert id\n"
             "first; NaN counts as largest) into weights fp32 [tokens, k] and ids int64 [tokens, k],\n"
             "renormalized to sum 1 when asked: afdserve.model.layers.route in one call.");

static int route_before(float a, float b)            /* a ranks above b */
{
    return (isnan(a) && !isnan(b)) || a > b;
}

static PyObject *route(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pl, ldl, T, E, k, pw, pi;
    int bf16, renorm;
    if (!PyArg_ParseTuple(args, "nnnnpnpnn", &pl, &ldl, &T, &E, &bf16, &k, &renorm, &pw, &pi)) return NULL;
    if (T < 0 || E <= 0 || E > 4096 || k <= 0 || k > E || ldl < E || (T && (!pl || !pw || !pi))) {
        PyErr_SetString(PyExc_ValueError, "route: bad sizes (0 < k <= experts <= 4096) or null buffer");
        return NULL;
    }
    float *w = (float *)pw;
    int64_t *ids = (int64_t *)pi;
    for (Py_ssize_t t = 0; t < T; t++) {
        float p[4096];
        const void *x = bf16 ? (const void *)((const uint16_t *)pl + t * ldl) : (const void *)((const float *)pl + t * ldl);
        float m = -INFINITY, sum = 0.f;
        for (Py_ssize_t e = 0; e < E; e++) m = fmaxf(m, ld(x, e, bf16));
        for (Py_ssize_t e = 0; e < E; e++) sum += p[e] = expf(ld(x, e, bf16) - m);
        for (Py_ssize_t e = 0; e < E; e++) p[e] /= sum;
        float kept = 0.f;
        for (Py_ssize_t j = 0; j < k; j++) {
            Py_ssize_t best = -1;
            for (Py_ssize_t e = 0; e < E; e++) {
                int taken = 0;
                for (Py_ssize_t i = 0; i < j; i++) taken |= ids[t * k + i] == e;
                if (!taken && (best < 0 || route_before(p[e], p[best]))) best = e;
            }
            ids[t * k + j] = best;
            kept += w[t * k + j] = p[best];
        }
        if (renorm)
            for (Py_ssize_t j = 0; j < k; j++) w[t * k + j] /= kept;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(argmax_doc,
             "argmax(x, ld, rows, cols, out, nthreads) -> None\n\n"
             "out[r] = the index of the largest of the `cols` fp32 values of row r of x (row stride ld),\n"
             "the first one where several are equal, the first NaN where there is one: torch.argmax\n"
             "over the last dim (greedy sampling of a batch's logits), rows over the threads.");

#ifdef AFD_X86
/* The largest of x[0:i) and whether they hold a NaN, eight lanes at a time, into *best / *has_nan;
   returns i, where the scalar loop goes on. */
TGT static Py_ssize_t row_max8(const float *x, Py_ssize_t n, float *best, int *has_nan)
{
    __m256 m = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        m = _mm256_max_ps(m, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int j = 0; j < 8; j++) *best = lanes[j] > *best ? lanes[j] : *best;
    *has_nan = _mm256_movemask_ps(nan) != 0;
    return i;
}
#endif

static int64_t row_argmax(const float *x, Py_ssize_t n)
{
    int has_nan = 0;
    float best = -INFINITY;
    Py_ssize_t i = 0;
#ifdef AFD_X86
    i = row_max8(x, n, &best, &has_nan);
#endif
    for (; i < n; i++) {
        has_nan |= isnan(x[i]);
        best = x[i] > best ? x[i] : best;
    }
    for (i = 0; i < n; i++)
        if (has_nan ? isnan(x[i]) : x[i] == best) return i;
    return 0;                                    /* (n == 0 is refused by the caller) */
}

static PyObject *argmax(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ld, M, N, po;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnnni", &px, &ld, &M, &N, &po, &nthreads)) return NULL;
    if (M < 0 || N <= 0 || ld < N || (M && (!px || !po))) {
        PyErr_SetString(PyExc_ValueError, "argmax: bad sizes or null buffer");
        return NULL;
    }
    const float *x = (const float *)px;
    int64_t *out = (int64_t *)po;
    const int nt = row_threads(M, N, nthreads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (Py_ssize_t r = 0; r < M; r++) out[r] = row_argmax(x + r * ld, N);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(write_kv_doc,
             "write_kv(k_cache, v_cache, num_slots, slots, tokens, k, ldk, v, ldv, row_bytes) -> None\n\n"
             "The new tokens' keys and values into their cache slots: row t of k (stride ldk bytes) to\n"
             "row slots[t] of k_cache, likewise v (rows of row_bytes; slots int64 [tokens], each checked\n"
             "against num_slots first): the two index_copy_ of a decode step in one call.");

static PyObject *write_kv(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pkc, pvc, N, ps, T, pk, ldk, pv, ldv, rb;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnn", &pkc, &pvc, &N, &ps, &T, &pk, &ldk, &pv, &ldv, &rb)) return NULL;
    if (T < 0 || N < 0 || rb <= 0 || ldk < rb || ldv < rb || !pkc || !pvc || !ps || !pk || !pv) {
        PyErr_SetString(PyExc_ValueError, "write_kv: bad sizes or null buffer");
        return NULL;
    }
    const int64_t *slots = (const int64_t *)ps;
    const Py_ssize_t bad = first_outside(slots, T, N);
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError, "write_kv: slot %lld outside the cache's 0..%zd", (long long)slots[bad], N - 1);
        return NULL;
    }
    for (Py_ssize_t t = 0; t < T; t++) {
        memcpy((char *)pkc + slots[t] * rb, (const char *)pk + t * ldk, (size_t)rb);
        memcpy((char *)pvc + slots[t] * rb, (const char *)pv + t * ldv, (size_t)rb);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rope_doc,
             "rope(x, ldx, tokens, heads, d, positions, cos, sin, table_rows, y, bf16, nthreads) -> None\n\n"
             "Rotate-half RoPE: x [tokens, heads, d] (token stride ldx, heads contiguous) into\n"
             "contiguous y; positions int64 [tokens] index the fp32 tables cos / sin [table_rows, d].\n"
             "bf16 or fp32 x / y; bitwise equal to afdserve.model.layers.RotaryEmbedding.");

static PyObject *rope(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t px, ldx, T, heads, d, ppos, pc, ps, P, py;
    int bf16, nthreads;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnpi", &px, &ldx, &T, &heads, &d, &ppos, &pc, &ps, &P, &py, &bf16,
                          &nthreads))
        return NULL;
    if (T < 0 || heads <= 0 || d <= 0 || d % 2 || ldx < heads * d || !px || !ppos || !pc || !ps || !py) {
        PyErr_SetString(PyExc_ValueError, "rope: bad sizes (d must be even) or null buffer");
        return NULL;
    }
    const int64_t *pos = (const int64_t *)ppos;
    const Py_ssize_t bad = first_outside(pos, T, P);
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "rope: position %lld outside the table's 0..%zd", (long long)pos[bad], P - 1);
        return NULL;
    }
    const size_t es = bf16 ? 2 : 4;
    const char *x = (const char *)px;
    char *y = (char *)py;
    const float *c = (const float *)pc, *s = (const float *)ps;
    const int nt = row_threads(T, heads * d, nthreads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (Py_ssize_t t = 0; t < T; t++)
        rope_row(x + (size_t)(t * ldx) * es, y + (size_t)(t * heads * d) * es, heads, d, c + pos[t] * d,
                 s + pos[t] * d, bf16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(silu_mul_doc,
             "silu_mul(gu, ldg, rows, width, y, bf16, nthreads) -> None\n\n"
             "y[m, i] = silu(gu[m, i]) * gu[m, width + i] for a fused gate|up projection gu (row stride\n"
             "ldg) into contiguous y [rows, width]; bf16 or fp32, rounded as afdserve.model.layers.silu_mul.");

static PyObject *silu_mul(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t pg, ldg, M, W, py;
    int bf16, nthreads;
    if (!PyArg_ParseTuple(args, "nnnnnpi", &pg, &ldg, &M, &W, &py, &bf16, &nthreads)) return NULL;
    if (M < 0 || W <= 0 || ldg < 2 * W || !pg || !py) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: bad sizes or null buffer");
        return NULL;
    }
    const size_t es = bf16 ? 2 : 4;
    const char *gu = (const char *)pg;
    char *y = (char *)py;
    const int nt = row_threads(M, W, nthreads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (Py_ssize_t m = 0; m < M; m++) afd_silu_mul_row(gu + (size_t)(m * ldg) * es, y + (size_t)(m * W) * es, W, bf16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#ifdef AFD_X86
/* One row of causal softmax: p[j] = bf16(exp(scale s[j] - max) / sum) for keys j < n_valid, 0 after. */
TGT static void softmax_row(float *s, uint16_t *p, Py_ssize_t n, Py_ssize_t n_valid, float scale)
{
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mv = _mm256_set1_ps(-INFINITY);
    Py_ssize_t j = 0;
    for (; j + 8 <= n_valid; j += 8) mv = _mm256_max_ps(mv, _mm256_mul_ps(_mm256_loadu_ps(s + j), sc));
    float mx = -INFINITY, tmp[8];
    _mm256_storeu_ps(tmp, mv);
    for (int i = 0; i < 8; i++) mx = tmp[i] > mx ? tmp[i] : mx;
    for (Py_ssize_t i = j; i < n_valid; i++) mx = s[i] * scale > mx ? s[i] * scale : mx;
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n_valid; j += 8)                 /* exp kept in place of the scores: s is scratch */
    {
        const __m256 e = afd_exp_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sc), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = afd_hsum8(sum8);
    for (Py_ssize_t i = j; i < n_valid; i++) {
        const float e = expf(s[i] * scale - mx);
        s[i] = e;
        sum += e;
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (j = 0; j + 8 <= n_valid; j += 8)
        afd_store_bf16x8(p + j, afd_round_bf16_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), inv)));
    for (; j < n_valid; j++) p[j] = afd_f32_to_bf16(s[j] * (1.f / sum));
    for (; j < n; j++) p[j] = 0;
}
#endif

PyDoc_STRVAR(softmax_bf16_doc,
             "softmax_bf16(s, lds, rows, n, scale, heads, first, p, ldp, nthreads) -> None\n\n"
             "Causal softmax of attention scores into bf16 probabilities: row r of the fp32 scores s\n"
             "(row stride lds; overwritten, it is scratch) is query position first + r // heads, which\n"
             "sees keys 0..first + r // heads; p[r, j] = bf16(softmax(scale * s[r, :visible])[j]), 0 for\n"
             "later keys. AVX2 exp (within a few fp32 ulp).");

static PyObject *softmax_bf16(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t ps, lds, M, N, heads, first, pp, ldp;
    float scale;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnnfnnnni", &ps, &lds, &M, &N, &scale, &heads, &first, &pp, &ldp, &nthreads))
        return NULL;
    if (M < 0 || N <= 0 || heads <= 0 || first < 0 || lds < N || ldp < N || !ps || !pp ||
        (M && first + (M - 1) / heads >= N)) {
        PyErr_SetString(PyExc_ValueError, "softmax_bf16: bad sizes (a query position beyond the keys) or null buffer");
        return NULL;
    }
#ifdef AFD_X86
    float *sc = (float *)ps;
    uint16_t *p = (uint16_t *)pp;
    const int nt = row_threads(M, N, nthreads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (Py_ssize_t r = 0; r < M; r++) softmax_row(sc + r * lds, p + r * ldp, N, first + r / heads + 1, scale);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

PyMethodDef afd_elementwise_methods[] = {
    {"softmax_bf16", softmax_bf16, METH_VARARGS, softmax_bf16_doc},
    {"rms_norm", rms_norm, METH_VARARGS, rms_norm_doc},
    {"rope", rope, METH_VARARGS, rope_doc},
    {"write_kv", write_kv, METH_VARARGS, write_kv_doc},
    {"add", add, METH_VARARGS, add_doc},
    {"route", route, METH_VARARGS, route_doc},
    {"argmax", argmax, METH_VARARGS, argmax_doc},
    {"silu_mul", silu_mul, METH_VARARGS, silu_mul_doc},
    {NULL, NULL, 0, NULL},
};
