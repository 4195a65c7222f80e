/* CPU SDDMM for the NeuroAda delta gradient: the compiled fast path of bypass.sddmm.
 *
 *     out[i, j] += sum_{t in [t0, t1)} g[t, i] * x[t, idx[i, j]]
 *
 * g: [T, d_out] (row stride ldg), x: [T, d_in] (row stride ldx), both fp32 or both bf16;
 * idx: int32 [d_out, k]; out: fp32 [d_out, k], overwritten with this token range's sums.
 * neuroada_sddmm (at the end) splits the tokens into parts, run on torch's OpenMP team where one
 * is bound (else on threads started per call), each with its own partial sums, added in a fixed
 * order (so the result is deterministic for a given thread count).
 *
 * Tokens go by blocks of tb (16-64, so that xT fits a core's L2). For each block, x is transposed
 * once into xT [d_in, tb] and g, 256 output rows at a time, into gT [256, tb] (fp32; bf16 is
 * widened on the way; 16x16 register tiles with AVX-512, 8x8 with AVX2); then each row gT[i] is
 * dotted with the k rows xT[idx[i, j]]: with AVX2 (8 lanes) or AVX-512 (16 lanes), eight dots at a
 * time on independent FMA chains (then four; the last k % 4 of a row wait to make a group of eight
 * with the next rows', so k = 1 costs one dot, not eight, and an eighth of a reduction tree) and
 * one horizontal-add tree per group; without, 16-lane partial sums the compiler vectorises. While
 * a block's dots run, the
 * next block's rows of x and g are prefetched (rows are often exactly a 4 KiB page apart, where
 * the hardware prefetcher stops). Nothing of size T x d_out or d_out x d_in is ever formed.
 *
 * Worked example (T = 1, d_out = 2, d_in = 3, k = 1): g = [[1, 2]], x = [[3, 4, 5]],
 * idx = [[2], [0]] -> out = [[1 * 5], [2 * 3]] = [[5], [6]].
 */
#include <pthread.h>
#include "neuroada.h"
#include <stdint.h>
#include <string.h>

#define TB_MAX 64  /* tokens per block, at most */
#define ROWS 256   /* output rows whose gT block is made at once */


static inline float bf16_to_f32(uint16_t v)
{
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

/* dot of two float vectors, 16 independent accumulators summed by a pairwise tree (vectorisable
 * without -ffast-math, and a fixed order, so results are deterministic) */
static inline float dot_tb(const float *a, const float *b, int n)
{
    float acc[16] = {0};
    int t = 0;
    for (; t + 16 <= n; t += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[t + l] * b[t + l];
    for (int w = 8; w > 0; w /= 2) /* pairwise tree: each step is one half-width SIMD add */
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    float s = acc[0];
    for (; t < n; t++) s += a[t] * b[t];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* In-register transpose of 8 rows of 8 floats: r[c] becomes (r0[c], ..., r7[c]). */
static inline void tr8x8(__m256 *r)
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#if defined(__AVX512F__)
/* In-register transpose of 16 rows of 16 floats: r[c] becomes (r0[c], ..., r15[c]). Four rounds
 * of 16 shuffles (pairs, quads within 128-bit lanes, then the 4x4 of lanes), a quarter shuffle per
 * float against the 8x8's three eighths; each output row is one whole 64-byte line. */
static inline void tr16x16(__m512 *r)
{
    __m512 t[16], u[16];
    for (int q = 0; q < 16; q += 2) {
        t[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
    }
    /* u[4b + m], lane L: column 4L + m of rows 4b .. 4b + 3 */
    for (int b = 0; b < 4; b++) {
        __m512 *a = t + 4 * b;
        u[4 * b + 0] = _mm512_shuffle_ps(a[0], a[2], 0x44);
        u[4 * b + 1] = _mm512_shuffle_ps(a[0], a[2], 0xEE);
        u[4 * b + 2] = _mm512_shuffle_ps(a[1], a[3], 0x44);
        u[4 * b + 3] = _mm512_shuffle_ps(a[1], a[3], 0xEE);
    }
    /* for each m, a 4x4 transpose of 128-bit lanes across u[m], u[4 + m], u[8 + m], u[12 + m] */
    for (int m = 0; m < 4; m++) {
        __m512 p0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), p1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        __m512 p2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44), p3 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        r[m] = _mm512_shuffle_f32x4(p0, p2, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(p0, p2, 0xDD);
        r[8 + m] = _mm512_shuffle_f32x4(p1, p3, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(p1, p3, 0xDD);
    }
}
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#define HAVE_TILES16 1
#endif
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* The dots run on the widest vectors the CPU has: 16 lanes with AVX-512, else 8 (tb, the block's
 * token count, is a multiple of 16 either way). */
#if defined(__AVX512F__) && defined(__AVX512DQ__)
typedef __m512 vecf;
#define VLANES 16
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VZERO _mm512_setzero_ps
#define VHALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))
#else
typedef __m256 vecf;
#define VLANES 8
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VZERO _mm256_setzero_ps
#define VHALVES(v) (v)
#endif

/* o[q] += dot(g, xr[q]) over tb floats for q < M (M = 8, 4, 2 or 1): M independent FMA chains, so
 * no lane is spent on a dot that is not needed, then one horizontal-add tree for all M sums (a
 * fixed order: results are deterministic). */
#define DEFINE_DOTS(NAME, M)                                                                           \
    static inline void NAME(const float *g, const float *const *xr, int tb, float *o)                 \
    {                                                                                                 \
        vecf acc[M];                                                                                  \
        for (int q = 0; q < M; q++) acc[q] = VZERO();                                                 \
        for (int c = 0; c < tb; c += VLANES) {                                                        \
            vecf gv = VLOAD(g + c);                                                                   \
            for (int q = 0; q < M; q++) acc[q] = VFMA(gv, VLOAD(xr[q] + c), acc[q]);                  \
        }                                                                                             \
        __m256 h[8];                                                                                  \
        for (int q = 0; q < 8; q++) h[q] = q < M ? VHALVES(acc[q]) : _mm256_setzero_ps();             \
        __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);                      \
        __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);                      \
        __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);                              \
        __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)); \
        float sums[8];                                                                                \
        _mm256_storeu_ps(sums, v);                                                                    \
        for (int q = 0; q < M; q++) o[q] += sums[q];                                                  \
    }
DEFINE_DOTS(dots_8, 8)
DEFINE_DOTS(dots_4, 4)
DEFINE_DOTS(dots_2, 2)
DEFINE_DOTS(dots_1, 1)

/* *o[q] += dot(g[q], xr[q]) for q < 8: eight dots of different output rows (the last few of each
 * row, see row_dots) on independent chains, summed by the same tree as above, so a dot gives the
 * same bits whichever group it falls in. */
static inline void dots_8_pairs(const float *const *g, const float *const *xr, int tb, float *const *o)
{
    vecf acc[8];
    for (int q = 0; q < 8; q++) acc[q] = VZERO();
    for (int c = 0; c < tb; c += VLANES)
        for (int q = 0; q < 8; q++) acc[q] = VFMA(VLOAD(g[q] + c), VLOAD(xr[q] + c), acc[q]);
    __m256 h[8];
    for (int q = 0; q < 8; q++) h[q] = VHALVES(acc[q]);
    __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);
    __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    float sums[8];
    _mm256_storeu_ps(sums, v);
    for (int q = 0; q < 8; q++) *o[q] += sums[q];
}
#define HAVE_VECTOR_DOTS 1
#endif

/* dst[c * tb + t] = src[t * ld + c] for t < n, c < width; columns t >= n are zeroed so the dots
 * can always run over tb. 16x16 register tiles with AVX-512 (tb is a multiple of 16, so every
 * store is one aligned-size 64-byte line of xT), then 8x8 tiles with AVX2, scalar for the edges:
 * each group of tokens takes the widest tiles that fit and finishes its last columns by hand. */
#ifdef HAVE_TILES16
#define TILES16(LOAD16, LOAD)                                                                              \
    for (; t + 16 <= n; t += 16) {                                                                    \
        int64_t c = 0;                                                                                \
        for (; c + 16 <= width; c += 16) {                                                            \
            __m512 r[16];                                                                             \
            for (int q = 0; q < 16; q++) r[q] = LOAD16(src + (t + q) * ld + c);                       \
            tr16x16(r);                                                                               \
            for (int q = 0; q < 16; q++) _mm512_storeu_ps(dst + (c + q) * tb + t, r[q]);              \
        }                                                                                             \
        EDGE(16, LOAD)                                                                                  \
    }
#else
#define TILES16(LOAD16, LOAD)
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define TILES8(LOAD8, LOAD)                                                                                \
    for (; t + 8 <= n; t += 8) {                                                                      \
        int64_t c = 0;                                                                                \
        for (; c + 8 <= width; c += 8) {                                                              \
            __m256 r[8];                                                                              \
            for (int q = 0; q < 8; q++) r[q] = LOAD8(src + (t + q) * ld + c);                         \
            tr8x8(r);                                                                                 \
            for (int q = 0; q < 8; q++) _mm256_storeu_ps(dst + (c + q) * tb + t, r[q]);               \
        }                                                                                             \
        EDGE(8, LOAD)                                                                                   \
    }
#else
#define TILES8(LOAD8, LOAD)
#endif
/* columns [c, width) of tokens [t, t + M) */
#define EDGE(M, LOAD)                                                                                    \
    for (int tt = t; tt < t + (M); tt++)                                                              \
        for (int64_t cc = c; cc < width; cc++) dst[cc * tb + tt] = LOAD(src[tt * ld + cc]);

#define DEFINE_TRANSPOSE(NAME, T_, LOAD, LOAD8, LOAD16)                                                \
    static void NAME(const T_ *src, int64_t ld, int64_t width, int n, int tb, float *dst)             \
    {                                                                                                 \
        int t = 0;                                                                                    \
        TILES16(LOAD16, LOAD)                                                                         \
        TILES8(LOAD8, LOAD)                                                                           \
        for (; t < n; t++) {                                                                          \
            const T_ *r = src + t * ld;                                                               \
            for (int64_t c = 0; c < width; c++) dst[c * tb + t] = LOAD(r[c]);                        \
        }                                                                                             \
        if (n < tb)                                                                                   \
            for (int64_t c = 0; c < width; c++) memset(dst + c * tb + n, 0, (size_t)(tb - n) * sizeof(float)); \
    }

/* Dots of different rows waiting to fill a group of eight (k = 1 would otherwise pay a whole
 * reduction tree per dot). */
typedef struct {
    const float *g[8], *x[8];
    float *o[8];
    int n;
    float sink; /* where a flushed group's unused slots add their sums */
} pending;

#ifdef HAVE_VECTOR_DOTS
static inline void pending_add(pending *p, const float *g, const float *x, float *o, int tb)
{
    p->g[p->n] = g, p->x[p->n] = x, p->o[p->n] = o;
    if (++p->n == 8) {
        dots_8_pairs(p->g, p->x, tb, p->o);
        p->n = 0;
    }
}
#endif

/* the waiting dots, before the gT rows they read are overwritten */
static inline void pending_flush(pending *p, int tb)
{
#ifdef HAVE_VECTOR_DOTS
    if (p->n == 0) return;
    for (int q = p->n; q < 8; q++) p->g[q] = p->g[0], p->x[q] = p->x[0], p->o[q] = &p->sink;
    dots_8_pairs(p->g, p->x, tb, p->o);
    p->n = 0;
#else
    (void)p, (void)tb;
#endif
}

/* out_row[j] += dot(gi, xT[row[j]]) for j < k: eight at a time, then four; the last k % 4 wait
 * in `pend` for dots of the next rows */
static inline void row_dots(const float *gi, const float *xT, const int32_t *row, int64_t k, int tb, float *out_row,
                            pending *pend)
{
#ifdef HAVE_VECTOR_DOTS
    const float *xr[8];
    int64_t j = 0;
#define DOTS_OF(M)                                                                                     \
    for (int q = 0; q < M; q++) xr[q] = xT + (int64_t)row[j + q] * tb;                                 \
    dots_##M(gi, xr, tb, out_row + j);                                                                 \
    j += M;
    while (k - j >= 8) { DOTS_OF(8) }
    if (k - j >= 4) { DOTS_OF(4) }
#undef DOTS_OF
    for (; j < k; j++) pending_add(pend, gi, xT + (int64_t)row[j] * tb, out_row + j, tb);
#else
    (void)pend;
    for (int64_t j = 0; j < k; j++) out_row[j] += dot_tb(gi, xT + (int64_t)row[j] * tb, tb);
#endif
}

/* Tokens per block: xT [d_in, tb] must stay in a core's L2 (~512 KiB of it) while the dots read
 * it at random rows. */
static int block_tokens(int64_t d_in) { return d_in <= 2048 ? 64 : d_in <= 4096 ? 32 : 16; }

/* Pull the next token block of x and g towards the core while this block's dots run: a few
 * cache lines per output row, so the misses of the next transposes overlap with work. */
typedef struct {
    const char *row, *g;  /* the row being prefetched; where g's rows start */
    int64_t ld, lines;    /* its row stride in bytes and 64-byte lines per row */
    int64_t ldg, glines;  /* the same for g, taken over when x's rows are done */
    int64_t line, left;   /* next line in the row; rows left in the current tensor (x, then g) */
    int64_t gleft;        /* rows of g (0 once switched) */
} prefetcher;
static inline void prefetch_some(prefetcher *p, int64_t count)
{
    for (; count > 0 && p->left > 0; count--) {
        __builtin_prefetch(p->row + p->line * 64, 0, 3);
        if (++p->line < p->lines) continue;
        p->line = 0, p->row += p->ld;
        if (--p->left == 0 && p->gleft > 0)
            p->row = p->g, p->ld = p->ldg, p->lines = p->glines, p->left = p->gleft, p->gleft = 0;
    }
}

#define DEFINE_SDDMM(NAME, TRANSPOSE, T_)                                                              \
    static void NAME(const T_ *g, int64_t ldg, const T_ *x, int64_t ldx, const int32_t *idx, int64_t d_out,   \
              int64_t d_in, int64_t k, int64_t t0, int64_t t1, float *out, float *scratch)            \
    {                                                                                                 \
        const int tb = block_tokens(d_in);                                                            \
        float *xT = scratch, *gT = scratch + d_in * TB_MAX;                                           \
        pending pend;                                                                                 \
        pend.n = 0;                                                                                   \
        memset(out, 0, (size_t)(d_out * k) * sizeof(float));                                          \
        for (int64_t b = t0; b < t1; b += tb) {                                                       \
            int n = (int)((t1 - b) < tb ? (t1 - b) : tb);                                             \
            int64_t nn = t1 - (b + tb) < tb ? t1 - (b + tb) : tb; /* tokens of the next block */     \
            prefetcher pf = {(const char *)(x + (b + tb) * ldx), (const char *)(g + (b + tb) * ldg),   \
                             ldx * (int64_t)sizeof(T_), (d_in * (int64_t)sizeof(T_) + 63) / 64,       \
                             ldg * (int64_t)sizeof(T_), (d_out * (int64_t)sizeof(T_) + 63) / 64,      \
                             0, nn > 0 ? nn : 0, nn > 0 ? nn : 0};                                    \
            int64_t per_row = (pf.left * (pf.lines + pf.glines) + d_out - 1) / d_out;                  \
            TRANSPOSE(x + b * ldx, ldx, d_in, n, tb, xT);                                             \
            for (int64_t i0 = 0; i0 < d_out; i0 += ROWS) {                                            \
                int64_t rows = d_out - i0 < ROWS ? d_out - i0 : ROWS;                                 \
                TRANSPOSE(g + b * ldg + i0, ldg, rows, n, tb, gT);                                    \
                for (int64_t i = 0; i < rows; i++) {                                                  \
                    prefetch_some(&pf, per_row);                                                      \
                    row_dots(gT + i * tb, xT, idx + (i0 + i) * k, k, tb, out + (i0 + i) * k, &pend);  \
                }                                                                                     \
                pending_flush(&pend, tb);                                                             \
            }                                                                                         \
        }                                                                                             \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
DEFINE_TRANSPOSE(transpose_f32, float, LOAD_F32, load8_f32, load16_f32)
DEFINE_TRANSPOSE(transpose_bf16, uint16_t, LOAD_BF16, load8_bf16, load16_bf16)
DEFINE_SDDMM(sddmm_range_f32, transpose_f32, float)
DEFINE_SDDMM(sddmm_range_bf16, transpose_bf16, uint16_t)

/* floats of scratch one thread needs (xT and gT blocks) */
int64_t neuroada_sddmm_scratch(int64_t d_in) { return (d_in + ROWS) * TB_MAX; }

#define MAX_THREADS 64

typedef struct {
    int bf16;
    const void *g, *x;
    int64_t ldg, ldx;
    const int32_t *idx;
    int64_t d_out, d_in, k, t0, t1;
    float *out, *scratch;
} sddmm_part;

static void *sddmm_part_run(void *arg)
{
    const sddmm_part *p = (const sddmm_part *)arg;
    if (p->bf16)
        sddmm_range_bf16((const uint16_t *)p->g, p->ldg, (const uint16_t *)p->x, p->ldx, p->idx, p->d_out, p->d_in,
                         p->k, p->t0, p->t1, p->out, p->scratch);
    else
        sddmm_range_f32((const float *)p->g, p->ldg, (const float *)p->x, p->ldx, p->idx, p->d_out, p->d_in, p->k,
                        p->t0, p->t1, p->out, p->scratch);
    return NULL;
}

/* The OpenMP runtime torch already runs its ops on (libgomp's entry points, passed in by
 * native.bind_openmp; NULL: none bound). A matmul leaves torch's worker threads spinning on the
 * other cores for a while (GOMP_SPINCOUNT) waiting for the next parallel op: a thread started
 * here then competes with them for a core, and on 2 cores a 2-thread SDDMM measured no faster
 * than 1 thread (bench/bench_kernels.py). Handing the parts to that same team instead puts them
 * on the threads that are waiting anyway, and starts no thread. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;

void neuroada_sddmm_set_openmp(void *parallel, void *thread_num, void *num_threads)
{
    if (parallel && thread_num && num_threads) {
        gomp_parallel = (gomp_parallel_fn)parallel;
        omp_thread_num = (omp_int_fn)thread_num;
        omp_num_threads = (omp_int_fn)num_threads;
    } else {
        gomp_parallel = 0;
    }
}

typedef void (*part_fn)(void *arg, int part, int parts);
typedef struct { part_fn fn; void *arg; int parts; } team_work;

/* one member of the OpenMP team: parts tid, tid + team size, ... (the team may be smaller than
 * asked for; what a part computes does not depend on who runs it) */
static void team_run(void *arg)
{
    const team_work *w = (const team_work *)arg;
    int step = omp_num_threads();
    for (int p = omp_thread_num(); p < w->parts; p += step > 0 ? step : 1) w->fn(w->arg, p, w->parts);
}

/* fn(arg, p, parts) for p < parts on the bound OpenMP team; returns 1, or 0 without running
 * anything when no team is bound (the caller then does the work its own way). refresh.c uses it
 * too. */
int neuroada_run_on_team(part_fn fn, void *arg, int parts)
{
    if (!gomp_parallel) return 0;
    team_work w = {fn, arg, parts};
    gomp_parallel(team_run, &w, (unsigned)parts, 0);
    return 1;
}

static void sddmm_part_of(void *arg, int part, int parts)
{
    (void)parts;
    sddmm_part_run(&((sddmm_part *)arg)[part]);
}

/* The whole SDDMM over tokens [0, T) in `threads` parts (at most 64): part p takes tokens
 * [T*p/threads, T*(p+1)/threads) rounded down to multiples of 64. Part 0 writes `out`, part p > 0
 * writes partials[(p-1) * d_out * k ...], added to `out` in order p = 1, 2, ... at the end, so the
 * result is deterministic for a given part count, whichever thread ran which part. The parts run
 * on the bound OpenMP team (above) or, without one, part 0 on the caller and the others on threads
 * started here (~0.02 ms each; a Python thread pool took ~0.3 ms to get its worker going).
 * scratch: threads * neuroada_sddmm_scratch(d_in) floats. Safe to call from several threads at
 * once as long as each passes its own out, partials and scratch. */
void neuroada_sddmm(int bf16, const void *g, int64_t ldg, const void *x, int64_t ldx, const int32_t *idx,
                    int64_t d_out, int64_t d_in, int64_t k, int64_t T, int threads, float *out, float *partials,
                    float *scratch)
{
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    sddmm_part parts[MAX_THREADS];
    const int64_t n = d_out * k, per = neuroada_sddmm_scratch(d_in);
    for (int p = 0; p < threads; p++) {
        int64_t t0 = T * p / threads / 64 * 64, t1 = p + 1 < threads ? T * (p + 1) / threads / 64 * 64 : T;
        sddmm_part part = {bf16, g, x, ldg, ldx, idx, d_out, d_in, k, t0, t1,
                           p == 0 ? out : partials + (p - 1) * n, scratch + p * per};
        parts[p] = part;
    }
    if (threads == 1 || !neuroada_run_on_team(sddmm_part_of, parts, threads)) {
        pthread_t tids[MAX_THREADS];
        int started[MAX_THREADS] = {0};
        for (int p = 1; p < threads; p++) started[p] = pthread_create(&tids[p], NULL, sddmm_part_run, &parts[p]) == 0;
        sddmm_part_run(&parts[0]);
        for (int p = 1; p < threads; p++) {
            if (started[p])
                pthread_join(tids[p], NULL);
            else
                sddmm_part_run(&parts[p]);
        }
    }
    for (int p = 1; p < threads; p++) {
        const float *src = parts[p].out;
        for (int64_t e = 0; e < n; e++) out[e] += src[e];
    }
}
