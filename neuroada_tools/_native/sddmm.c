/* CPU SDDMM for the NeuroAda delta gradient: the compiled fast path of bypass.sddmm.
 *
 *     out[i, j] += sum_{t in [t0, t1)} g[t, i] * x[t, idx[i, j]]
 *
 * g: [T, d_out] (row stride ldg), x: [T, d_in] (row stride ldx), both fp32 or both bf16;
 * idx: int32 [d_out, k]; out: fp32 [d_out, k], overwritten with this token range's sums.
 * One call handles one token range; callers give each thread its own range and its own `out`
 * and add the partial sums (so the result is deterministic for a given thread count).
 *
 * Tokens go by blocks of tb (16-64, so that xT fits a core's L2). For each block, x is transposed
 * once into xT [d_in, tb] and g, 256 output rows at a time, into gT [256, tb] (fp32; bf16 is
 * widened on the way); then each row gT[i] is dotted with the k rows xT[idx[i, j]]: with AVX2,
 * eight dots at a time on eight independent FMA chains and one horizontal-add tree; without,
 * 16-lane partial sums the compiler vectorises. Nothing of size T x d_out or d_out x d_in is
 * ever formed.
 *
 * Worked example (T = 1, d_out = 2, d_in = 3, k = 1): g = [[1, 2]], x = [[3, 4, 5]],
 * idx = [[2], [0]] -> out = [[1 * 5], [2 * 3]] = [[5], [6]].
 */
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
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
/* o[q] += dot(g, xr[q]) over tb floats (a multiple of 8) for q < m (m <= 8): eight independent FMA chains, then
 * one horizontal-add tree for all eight sums, so no dot pays a horizontal reduction of its own. */
static inline void dots8(const float *g, const float *const *xr, int m, int tb, float *o)
{
    __m256 acc[8];
    for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
    for (int c = 0; c < tb; c += 8) {
        __m256 gv = _mm256_loadu_ps(g + c);
        for (int q = 0; q < 8; q++) acc[q] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(xr[q] + c), acc[q]);
    }
    __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    if (m == 8) {
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v));
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int q = 0; q < m; q++) o[q] += tmp[q];
    }
}
#define HAVE_DOTS8 1

#define TILES(T_, LOAD8)                                                                               \
    for (; t + 8 <= n; t += 8)                                                                        \
        for (int64_t c = 0; c + 8 <= width; c += 8) {                                                 \
            __m256 r[8];                                                                              \
            for (int q = 0; q < 8; q++) r[q] = LOAD8(src + (t + q) * ld + c);                         \
            tr8x8(r);                                                                                 \
            for (int q = 0; q < 8; q++) _mm256_storeu_ps(dst + (c + q) * tb + t, r[q]);               \
        }
#else
#define TILES(T_, LOAD8)
#endif

/* dst[c * tb + t] = src[t * ld + c] for t < n, c < width; columns t >= n are zeroed so the dots
 * can always run over tb. 8x8 register tiles where AVX2 is available, scalar for the edges. */
#define DEFINE_TRANSPOSE(NAME, T_, LOAD, LOAD8)                                                        \
    static void NAME(const T_ *src, int64_t ld, int64_t width, int n, int tb, float *dst)             \
    {                                                                                                 \
        int t = 0;                                                                                    \
        TILES(T_, LOAD8)                                                                              \
        int64_t wfull = (t > 0) ? width / 8 * 8 : 0; /* columns the tiles covered for t' < t */       \
        for (int tt = 0; tt < t; tt++) {                                                              \
            const T_ *r = src + tt * ld;                                                              \
            for (int64_t c = wfull; c < width; c++) dst[c * tb + tt] = LOAD(r[c]);                    \
        }                                                                                             \
        for (; t < n; t++) {                                                                          \
            const T_ *r = src + t * ld;                                                               \
            for (int64_t c = 0; c < width; c++) dst[c * tb + t] = LOAD(r[c]);                         \
        }                                                                                             \
        if (n < tb)                                                                                   \
            for (int64_t c = 0; c < width; c++) memset(dst + c * tb + n, 0, (size_t)(tb - n) * sizeof(float)); \
    }

/* out_row[j] += dot(gi, xT[row[j]]) for j < k */
static inline void row_dots(const float *gi, const float *xT, const int32_t *row, int64_t k, int tb, float *out_row)
{
#ifdef HAVE_DOTS8
    for (int64_t j = 0; j < k; j += 8) {
        int m = (int)(k - j < 8 ? k - j : 8);
        const float *xr[8];
        for (int q = 0; q < 8; q++) xr[q] = xT + (int64_t)row[j + (q < m ? q : 0)] * tb;
        dots8(gi, xr, m, tb, out_row + j);
    }
#else
    for (int64_t j = 0; j < k; j++) out_row[j] += dot_tb(gi, xT + (int64_t)row[j] * tb, tb);
#endif
}

/* Tokens per block: xT [d_in, tb] must stay in a core's L2 (~512 KiB of it) while the dots read
 * it at random rows. */
static int block_tokens(int64_t d_in) { return d_in <= 2048 ? 64 : d_in <= 4096 ? 32 : 16; }

#define DEFINE_SDDMM(NAME, TRANSPOSE, T_)                                                              \
    void NAME(const T_ *g, int64_t ldg, const T_ *x, int64_t ldx, const int32_t *idx, int64_t d_out,   \
              int64_t d_in, int64_t k, int64_t t0, int64_t t1, float *out, float *scratch)            \
    {                                                                                                 \
        const int tb = block_tokens(d_in);                                                            \
        float *xT = scratch, *gT = scratch + d_in * TB_MAX;                                           \
        memset(out, 0, (size_t)(d_out * k) * sizeof(float));                                          \
        for (int64_t b = t0; b < t1; b += tb) {                                                       \
            int n = (int)((t1 - b) < tb ? (t1 - b) : tb);                                             \
            TRANSPOSE(x + b * ldx, ldx, d_in, n, tb, xT);                                             \
            for (int64_t i0 = 0; i0 < d_out; i0 += ROWS) {                                            \
                int64_t rows = d_out - i0 < ROWS ? d_out - i0 : ROWS;                                 \
                TRANSPOSE(g + b * ldg + i0, ldg, rows, n, tb, gT);                                    \
                for (int64_t i = 0; i < rows; i++)                                                    \
                    row_dots(gT + i * tb, xT, idx + (i0 + i) * k, k, tb, out + (i0 + i) * k);         \
            }                                                                                         \
        }                                                                                             \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
DEFINE_TRANSPOSE(transpose_f32, float, LOAD_F32, load8_f32)
DEFINE_TRANSPOSE(transpose_bf16, uint16_t, LOAD_BF16, load8_bf16)
DEFINE_SDDMM(neuroada_sddmm_f32, transpose_f32, float)
DEFINE_SDDMM(neuroada_sddmm_bf16, transpose_bf16, uint16_t)

/* floats of scratch one call needs (xT and gT blocks) */
int64_t neuroada_sddmm_scratch(int64_t d_in) { return (d_in + ROWS) * TB_MAX; }

/* dst[i] += src[i]: adds a thread's partial sums without a torch op (whose worker threads would
 * then spin-wait on the cores the next kernel call needs) */
void neuroada_add_f32(float *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}
