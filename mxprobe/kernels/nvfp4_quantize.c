/* The CPU twin of mxprobe.nvfp4's torch path for variant "torchao", round to nearest even: the
   same function, bit for bit, in one pass over memory.

   Built into the same library as native_quantize.c, with the same flags (no fast-math,
   -ffp-contract=off): every operation below rounds once, in the torch path's order:

     s      = e4m3(clamp((amax_b / 6) / pts, 2^-6, 448))      (e4m3: ties to even)
     y      = x * ((1 / pts) / s)
     q      = e2m1(clamp(y, -6, 6))                            (ties to even)
     result = (q * (s + amax_b * 0)) * pts

   Single-level scaling is pts = 1: dividing and multiplying by 1 is exact, so one loop serves
   both. amax_b * 0 is 0 for a finite block and NaN for a block holding NaN or Inf, which
   poisons the block as the torch path's `+ amax * 0.0` does; the signs of x (-0 included)
   pass through the multiplications.

   A tensor is seen as (outer, rows, width) with blocks of tile_rows x tile_cols elements: 1 x 16
   along the last axis, 16 x 1 along another axis (width = the elements after it), 16 x 16 tiles
   of the last two dimensions. A band is tile_rows consecutive rows of one slice, handled a
   strip of columns at a time; a call handles bands [begin, end), so the caller can split the
   work across threads. A tail block is simply smaller: the torch path's zero padding changes no
   block maximum. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { NV_F32 = 0, NV_BF16 = 1 };

typedef struct {
    int64_t outer, rows, width;
    int32_t tile_rows, tile_cols, dtype;
    float pts, inv_pts;
} nv_args;

/* Columns per strip (a multiple of 16): a strip of a 16-row band stays in L1 between the pass
   that takes the block maxima and the pass that quantizes. */
#define STRIP 512

static inline uint32_t nv_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float nv_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* x[start, start + n) as fp32: fp32 read in place, bf16 widened into buf (exact). */
static inline const float *nv_read(const void *x, int64_t start, float *restrict buf, int64_t n,
                                   int32_t dtype) {
    if (dtype == NV_F32) return (const float *)x + start;
    const uint16_t *p = (const uint16_t *)x + start;
    for (int64_t k = 0; k < n; k++) buf[k] = nv_float((uint32_t)p[k] << 16);
    return buf;
}

/* fp32 -> bf16 round to nearest even, as torch's cast; NaN becomes a quiet NaN (the addition
   would carry a NaN payload into the sign or exponent). */
static inline void nv_store_bf16(uint16_t *restrict p, const float *restrict res, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t u = nv_bits(res[k]);
        uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        p[k] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : r;
    }
}

#ifdef __AVX512F__
/* amax[0, 16) = max(amax, the |x| maxima (as bits) of the 16 blocks of 16 at p): 15 vector
   maxima in four halving stages (256-bit halves, 128-bit lanes, then 32- and 64-bit
   interleaves) instead of a horizontal reduction per block, about a fifth of the kernel's time;
   the stages leave block l + 4k in lane 4l + k, which the last permutation undoes. */
static inline void nv_amax_16_blocks(const float *p, uint32_t *amax) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_and_si512(_mm512_loadu_si512(p + 16 * i), magnitude);
    for (int i = 0; i < 8; i++) /* [a, a, b, b]: each block's 256-bit halves */
        v[i] = _mm512_max_epu32(_mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0x44),
                                _mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* [a, b, c, d]: one block's 4 partial maxima per 128 bits */
        v[i] = _mm512_max_epu32(_mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0x88),
                                _mm512_shuffle_i64x2(v[2 * i], v[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        v[i] = _mm512_max_epu32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    __m512i m = _mm512_max_epu32(_mm512_unpacklo_epi64(v[0], v[1]),
                                 _mm512_unpackhi_epi64(v[0], v[1]));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    m = _mm512_permutexvar_epi32(order, m);
    _mm512_storeu_si512(amax, _mm512_max_epu32(m, _mm512_loadu_si512(amax)));
}
#endif

/* The block factors of m blocks from their |x| maxima (as bits): factor = (1 / pts) / s and
   dequant = s + amax * 0. The E4M3 rounding is mx_blocks._round_even_float's: adding
   c = 2^(p + 20) (p = the binade of v, >= -6 after the clamp) keeps 3 bits after the leading
   one, ties to even, in one fp32 addition. A NaN v passes through every step as NaN. */
static void nv_block_factors(const uint32_t *restrict amax, float *restrict factor,
                             float *restrict dequant, int64_t m, float pts, float inv_pts) {
    for (int64_t j = 0; j < m; j++) {
        float am = nv_float(amax[j]);
        float v = (am / 6.0f) / pts;
        v = v < 0x1p-6f ? 0x1p-6f : (v > 448.0f ? 448.0f : v);
        float c = nv_float((nv_bits(v) & 0x7F800000u) + (20u << 23));
        float s = (v + c) - c;
        s = s > 448.0f ? 448.0f : s;
        factor[j] = inv_pts / s;
        dequant[j] = s + am * 0.0f;
    }
}

/* One element: clamp to ±6, round to E2M1 (c = 2^(max(p, 0) + 22): one bit after the leading
   one, 0.5 steps below 1), dequantize. */
static inline float nv_element(float x, float factor, float dequant, float pts) {
    float y = x * factor;
    y = y < -6.0f ? -6.0f : (y > 6.0f ? 6.0f : y);
    float ay = fabsf(y);
    float c = nv_float((nv_bits(ay < 1.0f ? 1.0f : ay) & 0x7F800000u) + (22u << 23));
    float r = (ay + c) - c; /* at most 6: |y| <= 6 and 6 is on the grid */
    return (copysignf(r, y) * dequant) * pts;
}

static void nv_range(const void *x, void *out, int64_t begin, int64_t end, const nv_args *args) {
    const nv_args a = *args;
    const int64_t tr = a.tile_rows, tc = a.tile_cols, nbands = (a.rows + tr - 1) / tr;
    uint32_t amax[STRIP];
    float factor[STRIP], dequant[STRIP], buf[STRIP], res[STRIP];
    for (int64_t band = begin; band < end; band++) {
        int64_t o = band / nbands, r0 = (band - o * nbands) * tr;
        int64_t nr = a.rows - r0 < tr ? a.rows - r0 : tr;
        int64_t base = (o * a.rows + r0) * a.width;
        for (int64_t i0 = 0; i0 < a.width; i0 += STRIP) {
            int64_t w = a.width - i0 < STRIP ? a.width - i0 : STRIP;
            int64_t m = (w + tc - 1) / tc; /* blocks in this strip */
            for (int64_t j = 0; j < m; j++) amax[j] = 0;
            for (int64_t r = 0; r < nr; r++) {
                const float *src = nv_read(x, base + r * a.width + i0, buf, w, a.dtype);
                if (tc == 1) {
                    for (int64_t k = 0; k < w; k++) {
                        uint32_t u = nv_bits(src[k]) & 0x7FFFFFFFu;
                        amax[k] = u > amax[k] ? u : amax[k];
                    }
                    continue;
                }
                int64_t j = 0;
#ifdef __AVX512F__
                for (; (j + 16) * 16 <= w; j += 16) nv_amax_16_blocks(src + j * 16, amax + j);
#endif
                for (; j < m; j++) {
                    int64_t nb = w - j * 16 < 16 ? w - j * 16 : 16;
                    uint32_t mx = amax[j];
                    for (int64_t k = 0; k < nb; k++) {
                        uint32_t u = nv_bits(src[j * 16 + k]) & 0x7FFFFFFFu;
                        mx = u > mx ? u : mx;
                    }
                    amax[j] = mx;
                }
            }
            nv_block_factors(amax, factor, dequant, m, a.pts, a.inv_pts);
            for (int64_t r = 0; r < nr; r++) {
                int64_t row = base + r * a.width + i0;
                const float *src = nv_read(x, row, buf, w, a.dtype);
                float *dst = a.dtype == NV_F32 ? (float *)out + row : res;
                if (tc == 1) {
                    for (int64_t k = 0; k < w; k++)
                        dst[k] = nv_element(src[k], factor[k], dequant[k], a.pts);
                } else {
                    for (int64_t j = 0; j < m; j++) {
                        const float f = factor[j], d = dequant[j];
                        const float *s16 = src + j * 16;
                        float *d16 = dst + j * 16;
                        if (w - j * 16 >= 16) /* a whole block: a constant trip count */
                            for (int64_t k = 0; k < 16; k++)
                                d16[k] = nv_element(s16[k], f, d, a.pts);
                        else
                            for (int64_t k = 0; k < w - j * 16; k++)
                                d16[k] = nv_element(s16[k], f, d, a.pts);
                    }
                }
                if (a.dtype == NV_BF16) nv_store_bf16((uint16_t *)out + row, res, w);
            }
        }
    }
}

/* Entry point: quantize bands [begin, end) of x into out (same dtype and layout), split into
   `threads` equal ranges on the OpenMP team where built with it (as mx_quantize). */
void nv_quantize(const void *x, void *out, int64_t begin, int64_t end, int32_t threads,
                 const nv_args *args) {
    const int64_t n = end - begin;
    if (threads <= 1) { /* no OpenMP call at all: a forked child must not touch the team */
        nv_range(x, out, begin, end, args);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int32_t t = 0; t < threads; t++)
        nv_range(x, out, begin + n * t / threads, begin + n * (t + 1) / threads, args);
}

static uint32_t nv_amax_range(const void *x, int64_t begin, int64_t end, int32_t dtype) {
    uint32_t m = 0;
    if (dtype == NV_F32) {
        const uint32_t *p = (const uint32_t *)x;
        for (int64_t k = begin; k < end; k++) {
            uint32_t u = p[k] & 0x7FFFFFFFu;
            m = u > m ? u : m;
        }
    } else {
        const uint16_t *p = (const uint16_t *)x;
        for (int64_t k = begin; k < end; k++) {
            uint32_t u = (uint32_t)(p[k] & 0x7FFFu) << 16;
            m = u > m ? u : m;
        }
    }
    return m;
}

/* The largest |x[k]| of x[begin, end) as fp32 bits (above 0x7F800000: x holds a NaN), for the
   per-tensor scale of two-level scaling; threads as nv_quantize. */
uint32_t nv_amax_bits(const void *x, int64_t begin, int64_t end, int32_t threads, int32_t dtype) {
    const int64_t n = end - begin;
    uint32_t m = 0;
    if (threads <= 1) return nv_amax_range(x, begin, end, dtype);
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(max : m)
    for (int32_t t = 0; t < threads; t++) {
        uint32_t part = nv_amax_range(x, begin + n * t / threads, begin + n * (t + 1) / threads,
                                      dtype);
        m = part > m ? part : m;
    }
    return m;
}
