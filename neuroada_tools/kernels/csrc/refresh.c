/* The bypass's per-forward refresh: write W0_sel + delta at the selected entries of the weight.
 *
 *     w[i * rs + idx[i, j] * cs] = cast(w0[i, j] + delta[i, j])    for i < d_out, j < k
 *
 * w: the weight's storage (rs, cs: strides of its logical [d_out, d_in] view, so a Conv1D weight
 * stored [d_in, d_out] passes rs = 1, cs = d_out); idx: int32 [d_out, k]; w0: the base values at
 * those entries, in the weight's dtype; delta: fp32 [d_out, k]. The sum is fp32 and the cast the
 * one torch does (bf16: round to nearest even; a NaN becomes the quiet NaN 0x7FC0), so the bits
 * equal those of bypass._neuroada_refresh's torch expression.
 *
 * The d_out * k writes land all over the weight, which the previous layers' work has pushed out
 * of cache: each row prefetches the lines it will write PF_ROWS rows later, so the misses overlap
 * instead of queueing. `parts` > 1 splits the rows over torch's OpenMP team (sddmm.c) where one
 * is bound, so each core keeps its own misses in flight; without a team it is one pass on the
 * caller (bench/bench_kernels.py compares both with torch's scatter_).
 *
 * Worked example (d_out = 2, d_in = 3, k = 1, fp32, rs = 3, cs = 1): w = [1, 2, 3, 4, 5, 6],
 * idx = [[2], [0]], w0 = [[3], [4]], delta = [[0.5], [-1]] -> w = [1, 2, 3.5, 3, 5, 6].
 */
#include "neuroada.h"
#include <stdint.h>
#include <string.h>

#define PF_ROWS 4 /* rows ahead whose lines are prefetched */

static inline float bf16_bits_to_f32(uint16_t v)
{
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16_bits(float f)
{
    union { float f; uint32_t u; } c;
    c.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((c.u + (((c.u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

#define AS_F32(v) (v)
#define AS_BF16(v) f32_to_bf16_bits(v)
#define FROM_BF16(v) bf16_bits_to_f32(v)

/* sddmm.c: fn(arg, p, parts) for p < parts on torch's OpenMP team; 0 (nothing run) without one */

typedef struct {
    void *w;
    int64_t rs, cs;
    const int32_t *idx;
    const void *w0;
    const float *delta;
    int64_t d_out, k;
} refresh_args;

/* rows [d_out * p / parts, d_out * (p + 1) / parts): each row is written by one part only */
#define DEFINE_REFRESH(NAME, T_, WIDEN, NARROW)                                                        \
    static void NAME##_rows(void *arg, int p, int parts)                                              \
    {                                                                                                 \
        const refresh_args *a = (const refresh_args *)arg;                                            \
        T_ *w = (T_ *)a->w;                                                                           \
        const T_ *w0 = (const T_ *)a->w0;                                                             \
        const int64_t rs = a->rs, cs = a->cs, k = a->k;                                               \
        const int64_t i0 = a->d_out * p / parts, i1 = a->d_out * (p + 1) / parts;                     \
        for (int64_t i = i0; i < i1; i++) {                                                           \
            if (i + PF_ROWS < i1) {                                                                   \
                const int32_t *later = a->idx + (i + PF_ROWS) * k;                                    \
                for (int64_t j = 0; j < k; j++)                                                       \
                    __builtin_prefetch(w + (i + PF_ROWS) * rs + (int64_t)later[j] * cs, 1, 3);        \
            }                                                                                         \
            const int32_t *row = a->idx + i * k;                                                      \
            for (int64_t j = 0; j < k; j++)                                                           \
                w[i * rs + (int64_t)row[j] * cs] = NARROW(WIDEN(w0[i * k + j]) + a->delta[i * k + j]); \
        }                                                                                             \
    }                                                                                                 \
    void NAME(T_ *w, int64_t rs, int64_t cs, const int32_t *idx, const T_ *w0, const float *delta,     \
              int64_t d_out, int64_t k, int parts)                                                    \
    {                                                                                                 \
        refresh_args a = {w, rs, cs, idx, w0, delta, d_out, k};                                       \
        if (parts <= 1 || parts > d_out || !neuroada_run_on_team(NAME##_rows, &a, parts))             \
            NAME##_rows(&a, 0, 1);                                                                    \
    }

DEFINE_REFRESH(neuroada_refresh_f32, float, AS_F32, AS_F32)
DEFINE_REFRESH(neuroada_refresh_bf16, uint16_t, FROM_BF16, AS_BF16)

/* Whether the delta changed since the last refresh: 1 if the n bytes at src differ from those at
 * kept (then kept becomes a copy of src), 0 if they are the same bits. One memcmp and at most one
 * memcpy: torch.equal plus copy_ took 0.1-0.4 ms here (a parallel region after a large matmul),
 * as much as the refresh it was meant to skip. */
int neuroada_keep_if_changed(void *kept, const void *src, int64_t n)
{
    if (memcmp(kept, src, (size_t)n) == 0) return 0;
    memcpy(kept, src, (size_t)n);
    return 1;
}
