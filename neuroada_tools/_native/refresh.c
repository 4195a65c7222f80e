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
 * instead of queueing (~2x faster than torch's scatter_ at 1024x1024; single-threaded, so the
 * bypass leaves large refreshes to torch: bench/bench_kernels.py).
 *
 * Worked example (d_out = 2, d_in = 3, k = 1, fp32, rs = 3, cs = 1): w = [1, 2, 3, 4, 5, 6],
 * idx = [[2], [0]], w0 = [[3], [4]], delta = [[0.5], [-1]] -> w = [1, 2, 3.5, 3, 5, 6].
 */
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

#define DEFINE_REFRESH(NAME, T_, WIDEN, NARROW)                                                        \
    void NAME(T_ *w, int64_t rs, int64_t cs, const int32_t *idx, const T_ *w0, const float *delta,     \
              int64_t d_out, int64_t k)                                                               \
    {                                                                                                 \
        for (int64_t i = 0; i < d_out; i++) {                                                         \
            if (i + PF_ROWS < d_out) {                                                                \
                const int32_t *later = idx + (i + PF_ROWS) * k;                                       \
                for (int64_t j = 0; j < k; j++)                                                       \
                    __builtin_prefetch(w + (i + PF_ROWS) * rs + (int64_t)later[j] * cs, 1, 3);        \
            }                                                                                         \
            const int32_t *row = idx + i * k;                                                         \
            for (int64_t j = 0; j < k; j++)                                                           \
                w[i * rs + (int64_t)row[j] * cs] = NARROW(WIDEN(w0[i * k + j]) + delta[i * k + j]);   \
        }                                                                                             \
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
