/* Per-row top-k of IEEE magnitude bits, ties to the lower column: the compiled fast path of
 * neuroada_tools/index/criteria.py (see its docstring for the ordering this must reproduce exactly).
 *
 * Plain C, no Python or torch headers: loaded with ctypes, called on contiguous row blocks,
 * one call per thread (ctypes releases the GIL). For each row of n keys
 * (key = magnitude bits, or their complement for "smallest", so "larger key wins" either way):
 *
 *   1. guess: keep the columns whose key >= the guess learned from the previous row (rows of a
 *      weight have similar distributions, so this keeps ~1.5k + 8 of n columns in one
 *      branch-free pass). If fewer than k survive, fall back to step 2.
 *   2. histogram of the key's top 8 bits over the row; the bucket B holding the k-th largest key;
 *      keep the columns whose top byte is >= B.
 *   3. on the kept list (still in column order): radix-refine the k-th largest key t, 8 bits a
 *      pass, and how many keys equal to t are taken (need); emit, in column order, each column
 *      with key > t, and the first `need` columns with key == t (ties to the lower column).
 *
 * Worked example (k = 2, keys [5, 9, 9, 1]): t = 9, nothing is larger, need = 2 -> columns
 * [1, 2]. With k = 1: t = 9, need = 1 -> column [1] (the lower of the tied pair).
 */
#include "neuroada.h"
#include <stdint.h>
#include <string.h>

/* k-th largest key among keys[0..cnt) (1 <= k <= cnt), by 8-bit radix passes from the top.
 * *need receives how many keys equal to the result belong to the top k. */
static uint32_t kth_largest(const uint32_t *keys, int64_t cnt, int64_t k, int bits, int64_t *need)
{
    uint32_t prefix = 0, pmask = 0;
    uint32_t hist[256];
    for (int shift = bits > 8 ? bits - 8 : 0;; shift = shift > 8 ? shift - 8 : 0) {
        int width = bits - shift;
        if (width > 8) width = 8;
        uint32_t dmask = ((1u << width) - 1u);
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < cnt; i++) {
            uint32_t key = keys[i];
            if ((key & pmask) == prefix) hist[(key >> shift) & dmask]++;
        }
        int64_t above = 0;
        int b = (int)dmask;
        for (; b > 0; b--) {
            if (above + hist[b] >= k) break;
            above += hist[b];
        }
        k -= above;
        prefix |= (uint32_t)b << shift;
        pmask |= dmask << shift;
        bits = shift;
        if (shift == 0) break;
    }
    *need = k;
    return prefix;
}

/* Emit the top-k of the kept list (cols/keys, in column order) into out[0..k). */
static void emit(const int32_t *cols, const uint32_t *keys, int64_t cnt, int64_t k, int bits, int32_t *out,
                 uint32_t floor, uint32_t *next_guess)
{
    int64_t need;
    uint32_t t = kth_largest(keys, cnt, k, bits, &need);
    int64_t j = 0;
    for (int64_t i = 0; i < cnt && j < k; i++) {
        uint32_t key = keys[i];
        if (key > t || (key == t && need > 0)) {
            if (key == t) need--;
            out[j++] = cols[i];
        }
    }
    /* Next row's guess: the key of rank about 1.5k + 8 in this row, so the next filter keeps a
     * little more than k. When the kept list is shorter than that, that key is below the filter's
     * floor and unknown: keep the floor. */
    int64_t m = k + k / 2 + 8;
    int64_t unused;
    *next_guess = m <= cnt ? kth_largest(keys, cnt, m, bits, &unused) : floor;
}

/* Append (column, key) of every key >= floor to cols/keys, in column order; return the count.
 * Blocks of 32 are skipped on a vectorisable max (signed: keys have at most 31 bits), so the
 * common case (a handful of survivors per row) costs about one SIMD compare per 32 entries. */
#define DEFINE_KEEP(T, S)                                                                                  \
    static int64_t keep_##T(const T *row, int64_t n, uint32_t mask, uint32_t flip, uint32_t floor,         \
                            int32_t *cols, uint32_t *keys)                                                \
    {                                                                                                     \
        const S smask = (S)mask, sflip = (S)flip, sfloor = (S)floor;                                      \
        int64_t cnt = 0, c = 0;                                                                           \
        for (; c + 32 <= n; c += 32) {                                                                    \
            S m = 0;                                                                                      \
            for (int i = 0; i < 32; i++) {                                                                \
                S key = (S)(((S)row[c + i] & smask) ^ sflip);                                             \
                m = key > m ? key : m;                                                                    \
            }                                                                                             \
            if (m < sfloor) continue;                                                                     \
            for (int i = 0; i < 32; i++) {                                                                \
                uint32_t key = ((uint32_t)row[c + i] & mask) ^ flip;                                      \
                cols[cnt] = (int32_t)(c + i);                                                             \
                keys[cnt] = key;                                                                          \
                cnt += key >= floor;                                                                      \
            }                                                                                             \
        }                                                                                                 \
        for (; c < n; c++) {                                                                              \
            uint32_t key = ((uint32_t)row[c] & mask) ^ flip;                                              \
            cols[cnt] = (int32_t)c;                                                                       \
            keys[cnt] = key;                                                                              \
            cnt += key >= floor;                                                                          \
        }                                                                                                 \
        return cnt;                                                                                       \
    }
DEFINE_KEEP(uint16_t, int16_t)
DEFINE_KEEP(uint32_t, int32_t)

#define DEFINE_SELECT(NAME, T, BITS)                                                                      \
    void NAME(const T *src, int64_t rows, int64_t n, int64_t row_stride, int64_t k, int smallest,           \
                 int32_t *out, int32_t *cols, uint32_t *keys)                                              \
    {                                                                                                     \
        const uint32_t mask = (uint32_t)((1ull << BITS) - 1ull);                                          \
        const uint32_t flip = smallest ? mask : 0u;                                                       \
        const int top = BITS - 8;                                                                         \
        uint32_t guess = 0;                                                                               \
        int have_guess = 0;                                                                               \
        for (int64_t r = 0; r < rows; r++) {                                                              \
            const T *row = src + r * row_stride;                                                          \
            int64_t cnt = 0;                                                                              \
            uint32_t floor = guess;                                                                       \
            if (have_guess) {                                                                             \
                cnt = keep_##T(row, n, mask, flip, guess, cols, keys);                                    \
            }                                                                                             \
            if (cnt < k) {                                                                                \
                uint32_t hist[256];                                                                       \
                memset(hist, 0, sizeof hist);                                                             \
                for (int64_t c = 0; c < n; c++) hist[(((uint32_t)row[c] & mask) ^ flip) >> top]++;        \
                int64_t above = 0;                                                                        \
                uint32_t b = 255;                                                                         \
                for (; b > 0; b--) {                                                                      \
                    if (above + hist[b] >= k) break;                                                      \
                    above += hist[b];                                                                     \
                }                                                                                         \
                uint32_t low = b << top;                                                                  \
                floor = low;                                                                              \
                cnt = keep_##T(row, n, mask, flip, low, cols, keys);                                      \
            }                                                                                             \
            emit(cols, keys, cnt, k, BITS, out + r * k, floor, &guess);                                          \
            have_guess = 1;                                                                               \
        }                                                                                                 \
    }

/* bf16 / fp16: 15 magnitude bits; fp32: 31. Buffers cols/keys hold n entries each. */
DEFINE_SELECT(neuroada_select_u16, uint16_t, 15)
DEFINE_SELECT(neuroada_select_u32, uint32_t, 31)

int neuroada_abi_version(void) { return NEUROADA_ABI; } /* neuroada.h: bump with any signature change */
