/* The inner loop of batchroute's inverted-file k-NN search (batchroute/routers/ivf.py).
 *
 * scan() scores a whole batch of queries against the lists they probe, list by list: each
 * block of 16 bank vectors is decoded once and scored against every query of the batch that
 * probes its list, while it is in the cache. faiss scans each (query, list) pair on its own,
 * so a list is read again for every query that probes it.
 *
 * The layout (built by ivf.py):
 *   codes      int16 [blocks][dim][16]: 16 vectors a block, dimension-major inside it, each
 *              component times 32767 and rounded (a unit vector's are in [-1, 1])
 *   block_off  int64 [lists + 1]: list l is blocks block_off[l] .. block_off[l + 1] - 1
 *   ids        int64 [blocks * 16]: the id of each slot, -1 for padding (never returned)
 *   queries    float32 [n][dim], already divided by 32767, so that a score is the inner
 *              product of the original vectors
 *   qstart     int64 [lists + 1], qlist int32 [qstart[lists]]: the queries that probe list l
 *              are qlist[qstart[l]] .. qlist[qstart[l + 1] - 1]
 *   distances  float32 [n][k], labels int64 [n][k]: per query its k best (score, id) so far,
 *              as a min-heap (the k-th best first); the caller fills them with (-inf, -1)
 *              before the first call, and a second call goes on from where one left off.
 *
 * Queries are scored four at a time against two blocks (32 vectors) at a time: eight
 * independent multiply-add chains, so that the loop is bound by throughput, not latency.
 * Every argument is checked before the loop; a malformed one raises ValueError and nothing
 * is read out of bounds. The GIL is released during the scan.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 16
#define GROUP 4

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One build runs well on any x86-64: the loader picks the widest SIMD the CPU has. */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* Put (v, id) at `pos` of a min-heap of k whose subtrees below `pos` are heaps, moving it
 * down until its children are no smaller; I moves along with D. */
static inline void sift_down(float *D, int64_t *I, Py_ssize_t k, Py_ssize_t pos, float v,
                             int64_t id) {
    for (;;) {
        Py_ssize_t c = 2 * pos + 1;
        if (c >= k) break;
        if (c + 1 < k && D[c + 1] < D[c]) c++;
        if (D[c] >= v) break;
        D[pos] = D[c];
        I[pos] = I[c];
        pos = c;
    }
    D[pos] = v;
    I[pos] = id;
}

/* Make D[0..k) a min-heap (the k-th best at its root). */
static void heapify(float *D, int64_t *I, Py_ssize_t k) {
    for (Py_ssize_t pos = k / 2 - 1; pos >= 0; pos--) sift_down(D, I, k, pos, D[pos], I[pos]);
}

/* Offer n scores of one query to its heap: a vectorisable test first, since most blocks
 * hold nothing better than the query's k-th best once its heap has filled. */
static inline void offer(const float *acc, int n, const int64_t *ids, float *D, int64_t *I,
                         Py_ssize_t k) {
    const float kth = D[0];
    int any = 0;
    for (int j = 0; j < n; j++) any |= acc[j] > kth;
    if (!any) return;
    for (int j = 0; j < n; j++)
        if (acc[j] > D[0] && ids[j] >= 0) sift_down(D, I, k, 0, acc[j], ids[j]);
}

MULTIVERSION
static void scan_lists(const int16_t *restrict codes, const int64_t *restrict block_off,
                       const int64_t *restrict ids, Py_ssize_t dim, Py_ssize_t lists,
                       const float *restrict queries, const int64_t *restrict qstart,
                       const int32_t *restrict qlist, Py_ssize_t k, float *restrict D,
                       int64_t *restrict I, float *restrict blk) {
    const Py_ssize_t per_block = dim * BLOCK;
    for (Py_ssize_t l = 0; l < lists; l++) {
        const int64_t q0 = qstart[l], q1 = qstart[l + 1], b1 = block_off[l + 1];
        if (q0 == q1) continue;
        for (int64_t b = block_off[l]; b < b1; b += 2) {
            const int pair = b + 1 < b1;
            const int16_t *cb = codes + b * per_block;
            if (b + 2 < b1) {
                const char *next = (const char *)(cb + 2 * per_block);
                for (Py_ssize_t o = 0; o < 2 * per_block * 2; o += 64) __builtin_prefetch(next + o);
            }
            /* blk: this block's vectors as floats, then the next block's (or zeros) */
            const Py_ssize_t ne = (1 + pair) * per_block;
            for (Py_ssize_t e = 0; e < ne; e++) blk[e] = (float)cb[e];
            for (Py_ssize_t e = ne; e < 2 * per_block; e++) blk[e] = 0.0f;
            const int64_t *bid = ids + b * BLOCK;
            const int n = (1 + pair) * BLOCK;
            for (int64_t t = q0; t < q1; t += GROUP) {
                /* the last group is padded with its own last query, scored and not offered */
                int32_t qi[GROUP];
                for (int u = 0; u < GROUP; u++) qi[u] = qlist[t + u < q1 ? t + u : q1 - 1];
                const float *g0 = queries + qi[0] * dim, *g1 = queries + qi[1] * dim;
                const float *g2 = queries + qi[2] * dim, *g3 = queries + qi[3] * dim;
                float a0[2 * BLOCK] = {0}, a1[2 * BLOCK] = {0};
                float a2[2 * BLOCK] = {0}, a3[2 * BLOCK] = {0};
                for (Py_ssize_t d = 0; d < dim; d++) {
                    const float *x = blk + d * BLOCK, *y = blk + per_block + d * BLOCK;
                    const float h0 = g0[d], h1 = g1[d], h2 = g2[d], h3 = g3[d];
                    for (int j = 0; j < BLOCK; j++) {
                        a0[j] += h0 * x[j];
                        a1[j] += h1 * x[j];
                        a2[j] += h2 * x[j];
                        a3[j] += h3 * x[j];
                        a0[BLOCK + j] += h0 * y[j];
                        a1[BLOCK + j] += h1 * y[j];
                        a2[BLOCK + j] += h2 * y[j];
                        a3[BLOCK + j] += h3 * y[j];
                    }
                }
                const int64_t m = q1 - t;
                offer(a0, n, bid, D + qi[0] * k, I + qi[0] * k, k);
                if (m > 1) offer(a1, n, bid, D + qi[1] * k, I + qi[1] * k, k);
                if (m > 2) offer(a2, n, bid, D + qi[2] * k, I + qi[2] * k, k);
                if (m > 3) offer(a3, n, bid, D + qi[3] * k, I + qi[3] * k, k);
            }
        }
    }
}

/* A C-contiguous, native-order buffer whose items are `size` bytes of one of `kinds` (struct
 * format letters); raises ValueError naming the argument otherwise. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t size,
                      const char *kinds, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: not a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    const char *fmt = view->format ? view->format : "B";
    char kind = fmt[strlen(fmt) - 1];
    if (view->itemsize != size || strchr(kinds, kind) == NULL || fmt[0] == '>' || fmt[0] == '!') {
        PyErr_Format(PyExc_ValueError, "%s: items of %zd bytes, format '%s'", name,
                     view->itemsize, fmt);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *o_codes, *o_off, *o_ids, *o_q, *o_qstart, *o_qlist, *o_D, *o_I;
    Py_ssize_t dim;
    if (!PyArg_ParseTuple(args, "OOOnOOOOO:scan", &o_codes, &o_off, &o_ids, &dim, &o_q,
                          &o_qstart, &o_qlist, &o_D, &o_I))
        return NULL;
    Py_buffer v[8];
    int got = 0;
    PyObject *result = NULL;
    float *blk = NULL;
    const struct { PyObject *obj; int writable; Py_ssize_t size; const char *kinds, *name; }
    spec[8] = {
        {o_codes, 0, 2, "h", "codes"}, {o_off, 0, 8, "lq", "block_off"},
        {o_ids, 0, 8, "lq", "ids"}, {o_q, 0, 4, "f", "queries"},
        {o_qstart, 0, 8, "lq", "qstart"}, {o_qlist, 0, 4, "il", "qlist"},
        {o_D, 1, 4, "f", "distances"}, {o_I, 1, 8, "lq", "labels"},
    };
    for (; got < 8; got++)
        if (get_buffer(spec[got].obj, &v[got], spec[got].writable, spec[got].size,
                       spec[got].kinds, spec[got].name) < 0)
            goto done;
    const int16_t *codes = v[0].buf;
    const int64_t *block_off = v[1].buf, *ids = v[2].buf, *qstart = v[4].buf;
    const float *queries = v[3].buf;
    const int32_t *qlist = v[5].buf;
    float *D = v[6].buf;
    int64_t *I = v[7].buf;
    Py_ssize_t n_codes = v[0].len / 2, n_off = v[1].len / 8, n_ids = v[2].len / 8;
    Py_ssize_t n_q = v[3].len / 4, n_qstart = v[4].len / 8, n_qlist = v[5].len / 4;
    Py_ssize_t n_D = v[6].len / 4, n_I = v[7].len / 8;

    if (dim < 1 || dim > (1 << 16)) {
        PyErr_Format(PyExc_ValueError, "dim: must be in [1, 65536], got %zd", dim);
        goto done;
    }
    if (n_codes % (dim * BLOCK)) {
        PyErr_Format(PyExc_ValueError, "codes: %zd values is not whole blocks of %zd x %d",
                     n_codes, dim, BLOCK);
        goto done;
    }
    const Py_ssize_t blocks = n_codes / (dim * BLOCK), lists = n_off - 1;
    if (lists < 0 || n_qstart != n_off) {
        PyErr_Format(PyExc_ValueError, "block_off and qstart: need lists + 1 entries each, "
                     "got %zd and %zd", n_off, n_qstart);
        goto done;
    }
    if (n_ids != blocks * BLOCK) {
        PyErr_Format(PyExc_ValueError, "ids: %zd entries for %zd blocks of %d", n_ids,
                     blocks, BLOCK);
        goto done;
    }
    if (block_off[0] != 0 || qstart[0] != 0 || block_off[lists] != blocks ||
        qstart[lists] != n_qlist) {
        PyErr_SetString(PyExc_ValueError, "block_off and qstart must run from 0 to the "
                        "number of blocks and of qlist entries");
        goto done;
    }
    for (Py_ssize_t l = 0; l < lists; l++)
        if (block_off[l + 1] < block_off[l] || qstart[l + 1] < qstart[l]) {
            PyErr_Format(PyExc_ValueError, "block_off and qstart must not decrease (list %zd)",
                         l);
            goto done;
        }
    if (n_q % dim) {
        PyErr_Format(PyExc_ValueError, "queries: %zd values is not rows of %zd", n_q, dim);
        goto done;
    }
    const Py_ssize_t n = n_q / dim;
    for (Py_ssize_t t = 0; t < n_qlist; t++)
        if (qlist[t] < 0 || qlist[t] >= n) {
            PyErr_Format(PyExc_ValueError, "qlist[%zd] = %d: not a query of %zd", t,
                         (int)qlist[t], n);
            goto done;
        }
    if (n == 0 || n_D % n || n_D != n_I || n_D / n < 1) {
        if (n == 0 && n_D == 0 && n_I == 0) {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
        PyErr_Format(PyExc_ValueError, "distances and labels: need n x k entries each (n = "
                     "%zd, k >= 1), got %zd and %zd", n, n_D, n_I);
        goto done;
    }
    const Py_ssize_t k = n_D / n;
    /* Each row must be a min-heap (root: its smallest): placeholders (-inf) are one, and
     * so is what an earlier call left; anything else is made one here. */
    for (Py_ssize_t q = 0; q < n; q++) heapify(D + q * k, I + q * k, k);
    blk = PyMem_Malloc(sizeof(float) * 2 * dim * BLOCK);
    if (blk == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    scan_lists(codes, block_off, ids, dim, lists, queries, qstart, qlist, k, D, I, blk);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(blk);
    for (int i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(codes, block_off, ids, dim, queries, qstart, qlist, distances, labels)\n\n"
     "Score each list's queries against its vectors, keeping each query's best in its row of\n"
     "distances/labels (min-heaps). See batchroute/routers/_ivfscan.c for the layout."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ivfscan",
    "The inner loop of batchroute's inverted-file k-NN search (batchroute.routers.ivf).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ivfscan(void) { return PyModule_Create(&module); }
