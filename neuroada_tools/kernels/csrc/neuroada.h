/* neuroada-tools compiled kernels: the one list of exported functions and the ABI number.
 *
 * Every .c file includes this header, so a prototype that disagrees with its definition fails the
 * build. kernels/native.py declares the same signatures for ctypes and refuses a library whose
 * neuroada_abi_version() differs from NEUROADA_ABI (read from this file): bump it with any change
 * below. Conventions: row strides in elements, int64_t sizes, indices int32, rows ascending. */
#ifndef NEUROADA_H
#define NEUROADA_H

#include <stdint.h>

#define NEUROADA_ABI 9

int neuroada_abi_version(void);

/* select.c: per row, the k columns of largest (flip = 0) or smallest (flip = 1) magnitude bits,
 * ties to the lower column, written ascending to out[r * k ...]; cols/keys: n-entry scratch. */
void neuroada_select_u16(const uint16_t *src, int64_t rows, int64_t n, int64_t row_stride, int64_t k, int smallest,
                         int32_t *out, int32_t *cols, uint32_t *keys);
void neuroada_select_u32(const uint32_t *src, int64_t rows, int64_t n, int64_t row_stride, int64_t k, int smallest,
                         int32_t *out, int32_t *cols, uint32_t *keys);

/* sddmm.c: out[i, j] = sum_t g[t, i] * x[t, idx[i, j]] in fp32, tokens split in `threads` parts. */
void neuroada_sddmm(int bf16, const void *g, int64_t ldg, const void *x, int64_t ldx, const int32_t *idx,
                    int64_t d_out, int64_t d_in, int64_t k, int64_t T, int threads, float *out, float *partials,
                    float *scratch);
int64_t neuroada_sddmm_scratch(int64_t d_in);
void neuroada_sddmm_set_openmp(void *parallel, void *thread_num, void *num_threads);
int neuroada_run_on_team(void (*fn)(void *arg, int part, int parts), void *arg, int parts);

/* refresh.c: w[i * rs + idx[i, j] * cs] = narrow(widen(w0[i, j]) + delta[i, j]). */
void neuroada_refresh_f32(float *w, int64_t rs, int64_t cs, const int32_t *idx, const float *w0, const float *delta,
                          int64_t d_out, int64_t k, int parts);
void neuroada_refresh_bf16(uint16_t *w, int64_t rs, int64_t cs, const int32_t *idx, const uint16_t *w0,
                           const float *delta, int64_t d_out, int64_t k, int parts);
int neuroada_keep_if_changed(void *kept, const void *src, int64_t n);

#endif
