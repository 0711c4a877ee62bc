/* The CPU twin of mx_blocks.quantize_blocks: the same function, bit for bit, in one pass.

   Built by mxprobe/kernels/native.py with the machine's C compiler at first use. It must be
   compiled without -ffast-math and with -ffp-contract=off: every step below relies on IEEE fp32
   arithmetic rounding exactly once (no FMA contraction, subnormals kept).

   A tensor is seen as (outer, length, inner); a block is block_size consecutive elements along
   `length` at a fixed (outer, inner); block-row r = (o, b) covers all `inner` columns of block b
   of slice o. A call handles block-rows [r_begin, r_end), so the caller can split the work
   across threads. The tail block (length % block_size) is simply shorter: the torch path pads
   it with zeros, which never change a block max, and drops the padding afterwards.

   Loops are kept simple (one job each, the format's choices hoisted out) so that the compiler
   vectorizes them; the arguments are copied into a local struct so that stores through `out`
   cannot alias them. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SM_FLOOR = 0, SM_CEIL = 1, SM_EVEN = 2, SM_RCEIL = 3 };
enum { RD_EVEN = 0, RD_NEAREST = 1, RD_FLOOR = 2, RD_STOCHASTIC = 3 };

typedef struct {
    int64_t outer, length, inner, block_size;
    int32_t dtype, emax, mbits, emin, is_int, scale_mode, rounding, clamp_out;
    float max_norm, inv_max_norm, out_max;
} mx_args;

/* Elements handled per chunk: one block along the last axis, or a strip of columns. */
#define CHUNK 4096
#define COLS 256

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 2^e for integer e in [-127, 127], from bits (2^-127 is the subnormal 0x00400000). */
static inline float pow2(int32_t e) {
    return from_bits(e >= -126 ? (uint32_t)(e + 127) << 23 : 0x00400000u);
}

/* floor(log2|x|) read from the bits; zero and subnormals give -127. */
static inline int32_t exponent_of(uint32_t u) { return (int32_t)((u >> 23) & 0xFF) - 127; }

/* ceil(log2 v) for v >= 0, exact for subnormals (scaled by 2^64 first); 0 gives -191. */
static inline int32_t ceil_log2(float v) {
    int32_t shift = v < 0x1p-126f ? 64 : 0;
    uint32_t n = bits_of(shift ? v * 0x1p64f : v);
    return exponent_of(n) + ((n & 0x7FFFFF) != 0) - shift;
}

/* The E8M0 scale exponent S of mx_blocks.block_scale_exponent, clamped to [-127, 127]. */
static int32_t scale_exponent(uint32_t amax_bits, const mx_args *a) {
    float amax = from_bits(amax_bits);
    int32_t s;
    if (a->scale_mode == SM_FLOOR) {
        s = exponent_of(amax_bits) - a->emax;
    } else if (a->scale_mode == SM_CEIL) {
        s = ceil_log2(amax) - a->emax;
    } else if (a->scale_mode == SM_EVEN) {
        int32_t shift = amax < 0x1p-126f ? 64 : 0;
        uint32_t n = bits_of(shift ? amax * 0x1p64f : amax);
        uint32_t bumped = (n + (1u << (22 - a->mbits))) & 0x7F800000u;
        s = exponent_of(bumped) - shift - a->emax;
    } else {
        s = ceil_log2(amax * a->inv_max_norm);
    }
    return s < -127 ? -127 : (s > 127 ? 127 : s);
}

/* down[j] = 2^-S and up[j] = 2^S of blocks j < m: one loop per scale mode, so that the common
   floor mode vectorizes; a poisoned block (amax >= Inf) gets S = 0, its output is NaN anyway. */
static void block_scales(const uint32_t *restrict amax, float *restrict down, float *restrict up,
                         int64_t m, const mx_args *a) {
    if (a->scale_mode == SM_FLOOR) {
        const int32_t emax = a->emax;
        for (int64_t j = 0; j < m; j++) {
            int32_t s = exponent_of(amax[j]) - emax;
            s = amax[j] >= 0x7F800000u ? 0 : (s < -127 ? -127 : (s > 127 ? 127 : s));
            down[j] = pow2(-s);
            up[j] = pow2(s);
        }
    } else {
        for (int64_t j = 0; j < m; j++) {
            int32_t s = amax[j] >= 0x7F800000u ? 0 : scale_exponent(amax[j], a);
            down[j] = pow2(-s);
            up[j] = pow2(s);
        }
    }
}

static inline void load(const void *restrict x, int64_t start, float *restrict buf, int64_t n,
                        int32_t dtype) {
    if (dtype == DT_F32) {
        const float *p = (const float *)x + start;
        for (int64_t k = 0; k < n; k++) buf[k] = p[k];
    } else if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)x + start;
        for (int64_t k = 0; k < n; k++) buf[k] = from_bits((uint32_t)p[k] << 16);
    } else {
        /* fp16 -> fp32 from bits (compilers do not vectorize _Float16): the 15 low bits moved
           into fp32 position are the value times 2^-112 (subnormals included), so one exact
           multiplication rebiases; Inf/NaN keep an all-ones exponent. With F16C the hardware
           widens 8 at a time (exact, as every fp16 is an fp32); the tail takes the loop. */
        const uint16_t *p = (const uint16_t *)x + start;
        int64_t k = 0;
#ifdef __F16C__
        for (; k + 8 <= n; k += 8)
            _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + k))));
#endif
        for (; k < n; k++) {
            uint32_t h = p[k], em = h & 0x7FFFu;
            float mag = from_bits(em << 13) * 0x1p112f;
            uint32_t u = em >= 0x7C00u ? (em << 13) | 0x7F800000u : bits_of(mag);
            buf[k] = from_bits(u | (h & 0x8000u) << 16);
        }
    }
}

/* fp32 -> fp16 bits, round to nearest even, for finite |v| <= 65504 (saturated before). */
static inline uint16_t to_fp16(float v) {
    uint32_t f = bits_of(v) & 0x7FFFFFFFu, sign = (bits_of(v) >> 16) & 0x8000u;
    /* below 2^-14 the result is subnormal: adding 0.5 rounds at 2^-24, fp16's subnormal step */
    uint32_t sub = bits_of(from_bits(f) + 0.5f) - 0x3F000000u;
    /* normal: rebias the exponent, add the rounding bias (half an ulp, plus one when odd) */
    uint32_t norm = (f + ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((f >> 13) & 1u)) >> 13;
    return (uint16_t)((f < 0x38800000u ? sub : norm) | sign);
}

/* The saturation of mx_blocks (clamp at the dtype's largest value), then the cast: fp32 -> bf16
   rounds to nearest even as torch's cast does; no NaN reaches it (poisoned blocks are stored
   by store_nan). */
static inline void clamp_run(float *restrict res, int64_t n, const mx_args *a) {
    if (a->clamp_out) {
        float m = a->out_max;
        for (int64_t k = 0; k < n; k++) res[k] = res[k] > m ? m : (res[k] < -m ? -m : res[k]);
    }
}

static inline void store(void *restrict out, int64_t start, float *restrict res, int64_t n,
                         const mx_args *a) {
    clamp_run(res, n, a);
    if (a->dtype == DT_F32) {
        float *p = (float *)out + start;
        for (int64_t k = 0; k < n; k++) p[k] = res[k];
    } else if (a->dtype == DT_BF16) {
        uint16_t *p = (uint16_t *)out + start;
        for (int64_t k = 0; k < n; k++) {
            uint32_t u = bits_of(res[k]);
            p[k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    } else {
        /* F16C narrows 8 at a time, round to nearest even like to_fp16 (subnormals exact:
           the conversion ignores MXCSR.FTZ; no DAZ, the self-check rejects fast-math builds) */
        uint16_t *p = (uint16_t *)out + start;
        int64_t k = 0;
#ifdef __F16C__
        for (; k + 8 <= n; k += 8)
            _mm_storeu_si128((__m128i *)(p + k),
                             _mm256_cvtps_ph(_mm256_loadu_ps(res + k), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; k < n; k++) p[k] = to_fp16(res[k]);
    }
}

/* The fp32 values of x[start, start + n): fp32 read in place, 16-bit dtypes widened into buf. */
static inline const float *read_run(const void *x, int64_t start, float *restrict buf, int64_t n,
                                    const mx_args *a) {
    if (a->dtype == DT_F32) return (const float *)x + start;
    load(x, start, buf, n, a->dtype);
    return buf;
}

/* Where quantized values of out[start, ...) are computed: out itself for fp32, res otherwise;
   write_run then finishes them (saturation in place, or the narrowing store from res). */
static inline float *result_run(void *out, int64_t start, float *res, const mx_args *a) {
    return a->dtype == DT_F32 ? (float *)out + start : res;
}

static inline void write_run(void *out, int64_t start, float *dst, int64_t n, const mx_args *a) {
    if (a->dtype == DT_F32)
        clamp_run(dst, n, a);
    else
        store(out, start, dst, n, a);
}

static void store_nan(void *restrict out, int64_t start, int64_t n, int32_t dtype) {
    for (int64_t k = 0; k < n; k++) {
        if (dtype == DT_F32) ((uint32_t *)out)[start + k] = 0x7FC00000u;
        else if (dtype == DT_BF16) ((uint16_t *)out)[start + k] = 0x7FC0u;
        else ((uint16_t *)out)[start + k] = 0x7E00u;
    }
}

/* The element step of one value y = x * 2^-S: rounded to the element grid and saturated at
   max_norm, sign kept (-0 stays -0). `SCALE(k)` gives element k's 2^-S / 2^S. */
#define ROUND_EVEN_FLOAT(y, v)                                                                 \
    do {                                                                                       \
        /* adding c = 2^(p + 23 - mbits) leaves mbits bits after the leading one and rounds  \
           ties to even in one fp32 addition; subtracting c again is exact */                 \
        float ay_ = fabsf(y);                                                                  \
        uint32_t binade_ = bits_of(ay_ < lo ? lo : ay_) & 0x7F800000u;                         \
        float c_ = from_bits(binade_ + shift_c);                                               \
        float r_ = (ay_ + c_) - c_;                                                            \
        v = copysignf(r_ > max_norm ? max_norm : r_, y);                                       \
    } while (0)

/* The general element step: p = max(exponent(y), emin), q = round(|y| / 2^(p - mbits)) by
   ROUND (one of the macros below, on r = |y| / step), times the step, saturated at max_norm. */
#define ROUND_GENERAL(y, v, ROUND, noise_k)                                                    \
    do {                                                                                       \
        int32_t p_ = exponent_of(bits_of(y));                                                  \
        p_ = p_ < emin ? emin : p_;                                                            \
        float r_ = fabsf(y) * pow2(mbits - p_), q_;                                            \
        ROUND(r_, q_, noise_k);                                                                \
        float m_ = q_ * pow2(p_ - mbits);                                                      \
        v = copysignf(m_ > max_norm ? max_norm : m_, y);                                       \
    } while (0)
/* r < 2^23 here: adding 2^23 rounds once, to an integer, ties to even */
#define RD_EVEN_OP(r, q, nz) q = (r + 0x1p23f) - 0x1p23f
#define RD_FLOOR_OP(r, q, nz) q = floorf(r)
#define RD_NEAREST_OP(r, q, nz) q = floorf(r) + ((r - floorf(r) >= 0.5f) ? 1.0f : 0.0f)
#define RD_STOCHASTIC_OP(r, q, nz) q = floorf(r) + (((nz) < r - floorf(r)) ? 1.0f : 0.0f)

/* One loop per (rounding, scale layout): the choices stay outside the vectorized loops. */
#define GENERAL_LOOP(ROUND, NOISE_K, DOWN_K, UP_K)                                             \
    for (int64_t k = 0; k < n; k++) {                                                          \
        float y = in[k] * (DOWN_K), v;                                                         \
        ROUND_GENERAL(y, v, ROUND, NOISE_K);                                                   \
        res[k] = v * (UP_K);                                                                   \
    }
#define GENERAL_LOOPS(DOWN_K, UP_K)                                                            \
    if (rounding == RD_EVEN) GENERAL_LOOP(RD_EVEN_OP, 0.0f, DOWN_K, UP_K)                      \
    else if (rounding == RD_FLOOR) GENERAL_LOOP(RD_FLOOR_OP, 0.0f, DOWN_K, UP_K)               \
    else if (rounding == RD_NEAREST) GENERAL_LOOP(RD_NEAREST_OP, 0.0f, DOWN_K, UP_K)           \
    else GENERAL_LOOP(RD_STOCHASTIC_OP, noise[k], DOWN_K, UP_K)

/* res[k] = quantized in[k] for k < n, one scale for all (per_lane = 0) or one per k. */
static inline void quantize_run(const float *restrict in, float *restrict res, int64_t n,
                                const float *restrict down, const float *restrict up,
                                int per_lane, const float *restrict noise, const mx_args *a) {
    const float lo = pow2(a->emin), max_norm = a->max_norm;
    const uint32_t shift_c = (uint32_t)(23 - a->mbits) << 23;
    const int32_t emin = a->emin, mbits = a->mbits, rounding = a->rounding;
    if (rounding == RD_EVEN && !a->is_int) {
        if (per_lane) {
            for (int64_t k = 0; k < n; k++) {
                float y = in[k] * down[k], v;
                ROUND_EVEN_FLOAT(y, v);
                res[k] = v * up[k];
            }
        } else {
            const float d = down[0], u = up[0];
            for (int64_t k = 0; k < n; k++) {
                float y = in[k] * d, v;
                ROUND_EVEN_FLOAT(y, v);
                res[k] = v * u;
            }
        }
    } else if (per_lane) {
        GENERAL_LOOPS(down[k], up[k])
    } else {
        const float d = down[0], u = up[0];
        GENERAL_LOOPS(d, u)
    }
}

static inline uint32_t abs_max_bits(const float *restrict buf, int64_t n) {
    uint32_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t u = bits_of(buf[k]) & 0x7FFFFFFFu;
        m = u > m ? u : m;
    }
    return m; /* >= 0x7F800000: the block holds an Inf or a NaN */
}

/* Blocks along the last axis (inner == 1): runs of whole blocks are contiguous, so up to CHUNK
   elements are loaded, quantized and stored by long loops, block by block in between. */
static void rows_contiguous(const void *x, void *out, const float *noise, int64_t r_begin,
                            int64_t r_end, const mx_args *a) {
    const int64_t bs = a->block_size, nblocks = (a->length + bs - 1) / bs;
    float buf[CHUNK], res[CHUNK], down[CHUNK], up[CHUNK];
    uint32_t amax[CHUNK];
    for (int64_t r = r_begin; r < r_end;) {
        int64_t o = r / nblocks, b = r - o * nblocks;
        int64_t m = nblocks - b; /* blocks left in this slice, at most CHUNK elements' worth */
        m = m < r_end - r ? m : r_end - r;
        m = m < CHUNK / bs ? m : CHUNK / bs;
        int64_t start = o * a->length + b * bs;
        int64_t len = a->length - b * bs < m * bs ? a->length - b * bs : m * bs;
        const float *src = read_run(x, start, buf, len, a);
        float *dst = result_run(out, start, res, a);
        int poisoned = 0;
        for (int64_t j = 0; j < m; j++) {
            int64_t nb = len - j * bs < bs ? len - j * bs : bs;
            amax[j] = bs == 32 && nb == 32 ? abs_max_bits(src + j * 32, 32)
                                           : abs_max_bits(src + j * bs, nb);
            poisoned |= amax[j] >= 0x7F800000u;
        }
        block_scales(amax, down, up, m, a);
        for (int64_t j = 0; j < m; j++) {
            int64_t nb = len - j * bs < bs ? len - j * bs : bs;
            const float *nz = noise ? noise + (r + j) * bs : NULL;
            if (bs == 32 && nb == 32) /* the common case, with a constant trip count */
                quantize_run(src + j * 32, dst + j * 32, 32, down + j, up + j, 0, nz, a);
            else
                quantize_run(src + j * bs, dst + j * bs, nb, down + j, up + j, 0, nz, a);
        }
        write_run(out, start, dst, len, a);
        if (poisoned) /* an Inf or a NaN poisons its whole block */
            for (int64_t j = 0; j < m; j++)
                if (amax[j] >= 0x7F800000u) {
                    int64_t nb = len - j * bs < bs ? len - j * bs : bs;
                    store_nan(out, start + j * bs, nb, a->dtype);
                }
        r += m;
    }
}

/* Blocks along a non-last axis: a strip of up to COLS columns at a time, a scale per column.
   fp32 rows are read and written in place (a strip of a block stays in L1 between the two
   passes); the 16-bit dtypes go through buf and res. */
static void rows_strided(const void *x, void *out, const float *noise, int64_t r_begin,
                         int64_t r_end, const mx_args *a) {
    const int64_t bs = a->block_size, nblocks = (a->length + bs - 1) / bs;
    uint32_t amax[COLS];
    float down[COLS], up[COLS], buf[COLS], res[COLS];
    for (int64_t r = r_begin; r < r_end; r++) {
        int64_t o = r / nblocks, b = r - o * nblocks;
        int64_t n = a->length - b * bs < bs ? a->length - b * bs : bs;
        int64_t base = (o * a->length + b * bs) * a->inner;
        for (int64_t i0 = 0; i0 < a->inner; i0 += COLS) {
            int64_t w = a->inner - i0 < COLS ? a->inner - i0 : COLS;
            for (int64_t j = 0; j < w; j++) amax[j] = 0;
            for (int64_t k = 0; k < n; k++) {
                const float *src = read_run(x, base + k * a->inner + i0, buf, w, a);
                for (int64_t j = 0; j < w; j++) {
                    uint32_t m = bits_of(src[j]) & 0x7FFFFFFFu;
                    amax[j] = m > amax[j] ? m : amax[j];
                }
            }
            int poisoned = 0;
            for (int64_t j = 0; j < w; j++) poisoned |= amax[j] >= 0x7F800000u;
            block_scales(amax, down, up, w, a);
            for (int64_t k = 0; k < n; k++) {
                int64_t row = base + k * a->inner + i0;
                const float *src = read_run(x, row, buf, w, a);
                float *dst = result_run(out, row, res, a);
                const float *nz = noise ? noise + (r * bs + k) * a->inner + i0 : NULL;
                quantize_run(src, dst, w, down, up, 1, nz, a);
                write_run(out, row, dst, w, a);
                if (poisoned)
                    for (int64_t j = 0; j < w; j++)
                        if (amax[j] >= 0x7F800000u) store_nan(out, row + j, 1, a->dtype);
            }
        }
    }
}

static void quantize_range(const void *x, void *out, const float *noise, int64_t r_begin,
                           int64_t r_end, const mx_args *args) {
    const mx_args a = *args;
    if (a.inner == 1 && a.block_size <= CHUNK)
        rows_contiguous(x, out, noise, r_begin, r_end, &a);
    else
        rows_strided(x, out, noise, r_begin, r_end, &a);
}

/* Entry point: quantize block-rows [begin, end) of x into out (same dtype and layout), split
   into `threads` equal ranges. noise (fp32, the torch path's padded (outer, nblocks,
   block_size, inner) draws) is read only for stochastic rounding.

   Built with -fopenmp the ranges run on an OpenMP team: native.py builds that only when the
   process already holds torch's libgomp, which then serves this library too (same soname), so
   the team is the one torch's own operators use, awake right after a GEMM. Without OpenMP the
   pragma is ignored and the caller splits the work itself (threads = 1 per call). */
void mx_quantize(const void *x, void *out, const float *noise, int64_t begin, int64_t end,
                 int32_t threads, const mx_args *args) {
    const int64_t n = end - begin;
    if (threads <= 1) { /* no OpenMP call at all: a forked child must not touch the team */
        quantize_range(x, out, noise, begin, end, args);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int32_t t = 0; t < threads; t++)
        quantize_range(x, out, noise, begin + n * t / threads, begin + n * (t + 1) / threads, args);
}

/* Elementwise rounding of fp32 x[begin, end) to bf16 (target 1) or fp16 (target 2) and back,
   round to nearest even, saturating at `top` (the largest value both hold); Inf and NaN pass
   through. out may be x itself. The twin of quantize._round_cast. Threads as mx_quantize. */
static void round_range(const float *x, float *out, int64_t begin, int64_t end, int32_t target,
                        float top) {
    for (int64_t k = begin; k < end; k++) {
        float v = x[k];
        uint32_t mag = bits_of(v) & 0x7FFFFFFFu;
        float c = v > top ? top : (v < -top ? -top : v);
        uint32_t u = bits_of(c), r;
        if (target == DT_BF16) {
            r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        } else {
            uint32_t h = to_fp16(c), em = h & 0x7FFFu;
            r = bits_of(from_bits(em << 13) * 0x1p112f) | (h & 0x8000u) << 16;
        }
        out[k] = mag >= 0x7F800000u ? v : from_bits(r);
    }
}

void mx_round(const float *x, float *out, int64_t begin, int64_t end, int32_t threads,
              int32_t target, float top) {
    const int64_t n = end - begin;
    if (threads <= 1) {
        round_range(x, out, begin, end, target, top);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int32_t t = 0; t < threads; t++)
        round_range(x, out, begin + n * t / threads, begin + n * (t + 1) / threads, target, top);
}

/* 1 when built with OpenMP: mx_quantize and mx_round then run their threads themselves. */
int mx_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int mx_abi_version(void) { return 4; }
