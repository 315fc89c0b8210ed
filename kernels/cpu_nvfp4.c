// CPU kernels: NVFP4 dequantize / quantize / fake-quantize and their gradients, W4A16, bf16 and int8 GEMVs for small
// batches, and the per-token KL of QAD and the evaluation.
// The NVFP4 numerics follow kernels/numerics.py exactly: value(code) * (float(e4m3 scale) * s2).
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static const float E2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                               -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

static float E4M3[256];

static float e4m3_decode(uint8_t byte) {  // float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa, no inf
    int exponent = (byte >> 3) & 0xF, mantissa = byte & 7;
    float magnitude;
    if (exponent == 0xF && mantissa == 7) magnitude = NAN;
    else if (exponent == 0) magnitude = ldexpf((float)mantissa, -9);
    else magnitude = ldexpf(1.f + mantissa / 8.f, exponent - 7);
    return (byte & 0x80) ? -magnitude : magnitude;
}

__attribute__((constructor)) static void init_e4m3_table(void) {
    for (int i = 0; i < 256; i++) E4M3[i] = e4m3_decode((uint8_t)i);
}

static inline float e4m3(uint8_t byte) { return E4M3[byte]; }

static inline void block_table(uint8_t scale, float gscale, float table[16]) {
    float s = e4m3(scale) * gscale;
    for (int i = 0; i < 16; i++) table[i] = E2M1[i] * s;
}

#ifdef __AVX2__
// 4 packed bytes -> 8 codes in element order (low nibble first) as int32 lanes.
static inline __m256i codes8(const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    __m128i bytes = _mm_cvtsi32_si128(word);
    __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}

static inline __m256 values8(__m256 magnitudes, __m256i codes) {
    __m256 v = _mm256_permutevar8x32_ps(magnitudes, _mm256_and_si256(codes, _mm256_set1_epi32(7)));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(sign));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif

void nvfp4_dequantize(const uint8_t *packed, const uint8_t *scales, float gscale, float *out,
                      int64_t rows, int64_t cols) {
    int64_t blocks = cols / 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *p = packed + r * (cols / 2) + b * 8;
            float *o = out + r * cols + b * 16;
#ifdef __AVX2__
            const __m256 grid = _mm256_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
            __m256 magnitudes = _mm256_mul_ps(grid, _mm256_set1_ps(e4m3(scales[r * blocks + b]) * gscale));
            _mm256_storeu_ps(o, values8(magnitudes, codes8(p)));
            _mm256_storeu_ps(o + 8, values8(magnitudes, codes8(p + 4)));
#else
            float table[16];
            block_table(scales[r * blocks + b], gscale, table);
            for (int j = 0; j < 8; j++) {
                o[2 * j] = table[p[j] & 0xF];
                o[2 * j + 1] = table[p[j] >> 4];
            }
#endif
        }
    }
}

#ifdef __AVX2__
// 8 packed bytes (one block of 16 codes) -> the 16 values 2 * e2m1(code) as int8, in element order (exact).
static inline __m128i doubled_e2m1_16(const uint8_t *p) {
    const __m128i doubled = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    return _mm_shuffle_epi8(doubled, _mm_unpacklo_epi8(lo, hi));
}

// acc[m] += sum_j x[m, j] * W_j over one block, W_j = 2 e2m1(code_j) * (scale / 2): the same fp32 values as the
// reference's e2m1 * scale (halving is exact), computed once per block and shared by every row of x.
static inline __attribute__((always_inline)) void gemv_block(const float *x, int64_t batch, int64_t cols,
                                                             const uint8_t *codes, float half_scale, __m256 *acc) {
    __m128i v = doubled_e2m1_16(codes);
    __m256 s = _mm256_set1_ps(half_scale);
    __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s);
    __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), s);
    for (int64_t m = 0; m < batch; m++)
        acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * cols + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * cols), acc[m]));
}
#endif

#ifdef __AVX2__
// y[m, r] for one weight row r; inlined with a constant batch, the accumulators stay in registers.
static inline __attribute__((always_inline)) void gemv_row(const float *x, int64_t batch, const uint8_t *row_codes,
                                                           const uint8_t *row_scales, float half_gscale, float *y,
                                                           int64_t rows, int64_t cols, int64_t r) {
    int64_t blocks = cols / 16, b = 0;
    __m256 even[16], odd[16];  // two chains: even and odd blocks (hides the FMA latency at batch 1)
    for (int64_t m = 0; m < batch; m++) even[m] = odd[m] = _mm256_setzero_ps();
    for (; b + 2 <= blocks; b += 2) {
        gemv_block(x + b * 16, batch, cols, row_codes + b * 8, e4m3(row_scales[b]) * half_gscale, even);
        gemv_block(x + (b + 1) * 16, batch, cols, row_codes + (b + 1) * 8, e4m3(row_scales[b + 1]) * half_gscale, odd);
    }
    if (b < blocks) gemv_block(x + b * 16, batch, cols, row_codes + b * 8, e4m3(row_scales[b]) * half_gscale, even);
    for (int64_t m = 0; m < batch; m++) y[m * rows + r] = hsum(_mm256_add_ps(even[m], odd[m]));
}
#endif

// y[m, r] = sum_k x[m, k] * W[r, k] for m < batch (batch <= 16), W given as NVFP4. Each row of x is summed in the
// same order whatever the batch, so a sequence's result does not depend on the rows beside it.
void nvfp4_gemv(const float *x, int64_t batch, const uint8_t *packed, const uint8_t *scales, float gscale,
                float *y, int64_t rows, int64_t cols) {
    int64_t blocks = cols / 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row_codes = packed + r * (cols / 2);
        const uint8_t *row_scales = scales + r * blocks;
#ifdef __AVX2__
        switch (batch) {  // a constant batch per case: the compiler keeps the accumulators in registers
#define GEMV_ROW(n) case n: gemv_row(x, n, row_codes, row_scales, gscale * 0.5f, y, rows, cols, r); break;
            GEMV_ROW(1) GEMV_ROW(2) GEMV_ROW(3) GEMV_ROW(4) GEMV_ROW(5) GEMV_ROW(6) GEMV_ROW(7) GEMV_ROW(8)
            default: gemv_row(x, batch, row_codes, row_scales, gscale * 0.5f, y, rows, cols, r);
#undef GEMV_ROW
        }
#else
        float acc[16] = {0}, table[16];
        for (int64_t b = 0; b < blocks; b++) {
            block_table(row_scales[b], gscale, table);
            for (int64_t m = 0; m < batch; m++) {
                const float *xb = x + m * cols + b * 16;
                for (int j = 0; j < 8; j++)
                    acc[m] += xb[2 * j] * table[row_codes[b * 8 + j] & 0xF] + xb[2 * j + 1] * table[row_codes[b * 8 + j] >> 4];
            }
        }
        for (int64_t m = 0; m < batch; m++) y[m * rows + r] = acc[m];
#endif
    }
}

// y[m, r] = sum_k x[m, k] * W[r, k] for m < batch (batch <= 16), W bf16 (raw bits). Every bf16 value
// is exact in fp32, so this is an fp32 product over weights held at half the bytes.
static inline float bf16_value(uint16_t bits) {
    uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, 4);
    return value;
}

void bf16_gemv(const float *x, int64_t batch, const uint16_t *w, float *y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = w + r * cols;
        int64_t k = 0;
        float sums[16] = {0};
#ifdef __AVX2__
        __m256 acc[16];
        for (int64_t m = 0; m < batch; m++) acc[m] = _mm256_setzero_ps();
        for (; k + 8 <= cols; k += 8) {
            __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
            __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
            for (int64_t m = 0; m < batch; m++) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * cols + k), acc[m]);
        }
        for (int64_t m = 0; m < batch; m++) sums[m] = hsum(acc[m]);
#endif
        for (; k < cols; k++)
            for (int64_t m = 0; m < batch; m++) sums[m] += x[m * cols + k] * bf16_value(row[k]);
        for (int64_t m = 0; m < batch; m++) y[m * rows + r] = sums[m];
    }
}

// Block-int8 tables (a vocabulary held exactly as int8 codes x one fp16 scale per 32 values):
// value = bf16(float(code) * float(scale)), the bf16 number the checkpoint holds, read at ~half its bytes.
static inline float fp16_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0) {  // zero or subnormal (rare): the slow exact way
        float magnitude = ldexpf((float)mantissa, -24);
        return sign ? -magnitude : magnitude;
    }
    uint32_t word = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127; finite scales only
    float value;
    memcpy(&value, &word, 4);
    return value;
}

static inline float bf16_round(float v) {  // round to nearest even, as torch's float -> bfloat16 (finite v)
    uint32_t word;
    memcpy(&word, &v, 4);
    word = (word + 0x7FFF + ((word >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&v, &word, 4);
    return v;
}

#ifdef __AVX2__
static inline __m256 int8_block_values8(const int8_t *codes, __m256 scale) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)codes);
    __m256i word = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(word, 16), _mm256_set1_epi32(1));
    word = _mm256_add_epi32(word, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(word, _mm256_set1_epi32((int)0xFFFF0000u)));
}
#endif

#ifdef __AVX2__
// One row of W against `batch` rows of x, four independent sums per x row so the FMAs do not wait on
// each other; inlined with a constant batch (1-4), the sums live in registers.
static inline __attribute__((always_inline)) void int8_block_row(const float *x, int64_t batch, const int8_t *row,
                                                                 const uint16_t *row_scales, float *y, int64_t rows,
                                                                 int64_t cols) {
    __m256 sum[4][4];
    for (int64_t m = 0; m < batch; m++)
        for (int part = 0; part < 4; part++) sum[m][part] = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++) {
        __m256 scale = _mm256_set1_ps(fp16_value(row_scales[b]));
        for (int part = 0; part < 4; part++) {
            __m256 w = int8_block_values8(row + b * 32 + part * 8, scale);
            for (int64_t m = 0; m < batch; m++)
                sum[m][part] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * cols + b * 32 + part * 8), sum[m][part]);
        }
    }
    for (int64_t m = 0; m < batch; m++)
        y[m * rows] = hsum(_mm256_add_ps(_mm256_add_ps(sum[m][0], sum[m][1]), _mm256_add_ps(sum[m][2], sum[m][3])));
}
#endif

// y[m, r] = sum_k x[m, k] * W[r, k] for m < batch (batch <= 16); cols is a multiple of 32.
void int8_block_gemv(const float *x, int64_t batch, const int8_t *codes, const uint16_t *scales, float *y,
                     int64_t rows, int64_t cols) {
    int64_t blocks = cols / 32;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *row = codes + r * cols;
        const uint16_t *row_scales = scales + r * blocks;
#ifdef __AVX2__
        for (int64_t m0 = 0; m0 < batch; m0 += 4) {  // x rows four at a time (decode batches are small)
            const float *xm = x + m0 * cols;
            float *ym = y + m0 * rows + r;
            switch (batch - m0 >= 4 ? 4 : batch - m0) {
                case 1: int8_block_row(xm, 1, row, row_scales, ym, rows, cols); break;
                case 2: int8_block_row(xm, 2, row, row_scales, ym, rows, cols); break;
                case 3: int8_block_row(xm, 3, row, row_scales, ym, rows, cols); break;
                default: int8_block_row(xm, 4, row, row_scales, ym, rows, cols);
            }
        }
#else
        float acc[16] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            float scale = fp16_value(row_scales[b]);
            for (int j = 0; j < 32; j++) {
                float w = bf16_round((float)row[b * 32 + j] * scale);
                for (int64_t m = 0; m < batch; m++) acc[m] += x[m * cols + b * 32 + j] * w;
            }
        }
        for (int64_t m = 0; m < batch; m++) y[m * rows + r] = acc[m];
#endif
    }
}

// float -> float8_e4m3fn byte, round to nearest even; v is already clamped to [2^-9, 448] (> 0). Below
// 2^-6 the code is the count of 2^-9 steps (8 steps: the smallest normal, code 8); above it, v's float
// mantissa rounded to 3 bits (a carry moves into the exponent) and its exponent rebiased from 127 to 7.
// Equal to frexpf/ldexpf-based rounding for every float in [2^-9, 448] (checked exhaustively), without
// the library calls that dominated the amax-rule kernels.
static inline uint8_t e4m3_encode(float v) {
    if (v < 0x1p-6f) return (uint8_t)nearbyintf(v * 512.f);
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFFFu + ((bits >> 20) & 1u);
    return (uint8_t)((((bits >> 23) - 120u) << 3) | ((bits >> 20) & 7u));
}

// Codes of x / m for m = float(scale) * s2, as kernels/numerics.py encode_e2m1 does it.
static inline uint8_t e2m1_encode(float scaled) {
    float a = fabsf(scaled);
    uint8_t code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);
    return code | ((scaled < 0.f) << 3);  // -0.0 < 0 is false: no sign bit, as ModelOpt
}

static inline uint8_t block_scale(float amax, float gscale) {  // ModelOpt's rule, e4m3-encoded
    float s = amax / (6.f * gscale);
    if (s == 0.f) s = 1.f;
    return e4m3_encode(fminf(fmaxf(s, 0x1p-9f), 448.f));
}

#ifdef __AVX2__
// e2m1_encode on 8 lanes (the same comparisons, so the same codes), as int32 lanes.
static inline __m256i e2m1_codes8(__m256 scaled) {
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), scaled);
    __m256i count = _mm256_setzero_si256();  // each true comparison is -1
#define NVFP4_STEP(op, bound) count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(bound), op)))
    NVFP4_STEP(_CMP_GT_OQ, 0.25f); NVFP4_STEP(_CMP_GE_OQ, 0.75f); NVFP4_STEP(_CMP_GT_OQ, 1.25f);
    NVFP4_STEP(_CMP_GE_OQ, 1.75f); NVFP4_STEP(_CMP_GT_OQ, 2.5f); NVFP4_STEP(_CMP_GE_OQ, 3.5f);
    NVFP4_STEP(_CMP_GT_OQ, 5.f);
#undef NVFP4_STEP
    __m256i negative = _mm256_castps_si256(_mm256_cmp_ps(scaled, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(count, _mm256_and_si256(negative, _mm256_set1_epi32(8)));
}

// 8 codes (int32 lanes, element order) -> 4 bytes, even element in the low nibble.
static inline void pack8(__m256i codes, uint8_t *out) {
    int64_t pairs[4];  // each 64-bit lane holds (even, odd): even | odd << 4 in its low byte
    _mm256_storeu_si256((__m256i *)pairs, _mm256_or_si256(codes, _mm256_srli_epi64(codes, 28)));
    for (int j = 0; j < 4; j++) out[j] = (uint8_t)pairs[j];
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
#endif

// ModelOpt's e4m3 block scale of the 16 values at xb.
static inline uint8_t block_scale16(const float *xb, float gscale) {
#ifdef __AVX2__
    __m256 sign = _mm256_set1_ps(-0.f);
    return block_scale(hmax(_mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb)),
                                          _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8)))), gscale);
#else
    float amax = 0.f;
    for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(xb[i]));
    return block_scale(amax, gscale);
#endif
}

// ModelOpt's NVFP4QTensor.quantize for a [rows, cols] fp32 matrix with a given s2; writes packed codes
// and e4m3 block scales. With `fixed_scales` set, the given scales are used instead of the amax rule.
void nvfp4_quantize(const float *x, float gscale, uint8_t *packed, uint8_t *scales, int fixed_scales,
                    int64_t rows, int64_t cols) {
    int64_t blocks = cols / 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + r * cols + b * 16;
            uint8_t *scale = scales + r * blocks + b;
            uint8_t *out = packed + r * (cols / 2) + b * 8;
            if (!fixed_scales) *scale = block_scale16(xb, gscale);
#ifdef __AVX2__
            __m256 m = _mm256_set1_ps(E4M3[*scale] * gscale);
            pack8(e2m1_codes8(_mm256_div_ps(_mm256_loadu_ps(xb), m)), out);
            pack8(e2m1_codes8(_mm256_div_ps(_mm256_loadu_ps(xb + 8), m)), out + 4);
#else
            float m = E4M3[*scale] * gscale;
            for (int j = 0; j < 8; j++)
                out[j] = e2m1_encode(xb[2 * j] / m) | (e2m1_encode(xb[2 * j + 1] / m) << 4);
#endif
        }
    }
}

// dequantize(quantize(x)) in one pass, without the packed intermediate: the same scale and code rules
// and the same products as nvfp4_quantize followed by nvfp4_dequantize, so the same bits. Given
// `scales` (rows x cols/16 e4m3 bytes) are used as they are; NULL: the amax rule, as in quantize.
void nvfp4_fake_quantize(const float *x, float gscale, const uint8_t *scales, float *out, int64_t rows, int64_t cols) {
    int64_t blocks = cols / 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + r * cols + b * 16;
            float *o = out + r * cols + b * 16;
            uint8_t scale = scales ? scales[r * blocks + b] : block_scale16(xb, gscale);
#ifdef __AVX2__
            __m256 m = _mm256_set1_ps(E4M3[scale] * gscale);
            __m256 magnitudes = _mm256_mul_ps(_mm256_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f), m);
            _mm256_storeu_ps(o, values8(magnitudes, e2m1_codes8(_mm256_div_ps(_mm256_loadu_ps(xb), m))));
            _mm256_storeu_ps(o + 8, values8(magnitudes, e2m1_codes8(_mm256_div_ps(_mm256_loadu_ps(xb + 8), m))));
#else
            float table[16];
            block_table(scale, gscale, table);
            float m = E4M3[scale] * gscale;
            for (int i = 0; i < 16; i++) o[i] = table[e2m1_encode(xb[i] / m)];
#endif
        }
    }
}

// Backward of fake-quantization under learned block scales (LSQ). `scale` holds each block's fp32 scale
// (the exp of its learned logarithm) and `scales` its e4m3 rounding s8 as the forward used it. With
// m = s8 * s2, u = x / m and q = e2m1(u) (the forward's codes): grad_x = grad where |u| <= 6, else 0 (the
// clipped values do not move with x); the block's d/d log m = m * sum grad * (q - u) over the unclipped
// elements plus m * sum grad * q over the clipped ones, and grad_log_scales = that * s / s8 (e4m3 rounding
// straight through), or 0 where s is held at e4m3's bounds [2^-9, 448].
void nvfp4_scale_gradient(const float *x, const float *grad, const float *scale, const uint8_t *scales, float gscale,
                          float *grad_x, float *grad_log_scales, int64_t rows, int64_t cols) {
    int64_t blocks = cols / 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            int64_t at = r * cols + b * 16;
            float s = scale[r * blocks + b], s8 = E4M3[scales[r * blocks + b]], m = s8 * gscale;
#ifdef __AVX2__
            const __m256 grid = _mm256_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
            __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
            for (int half = 0; half < 16; half += 8) {
                __m256 u = _mm256_div_ps(_mm256_loadu_ps(x + at + half), mv);
                __m256 q = values8(grid, e2m1_codes8(u));
                __m256 inside = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), u), _mm256_set1_ps(6.f), _CMP_LE_OQ);
                __m256 g = _mm256_loadu_ps(grad + at + half);
                acc = _mm256_fmadd_ps(g, _mm256_sub_ps(q, _mm256_and_ps(inside, u)), acc);
                _mm256_storeu_ps(grad_x + at + half, _mm256_and_ps(inside, g));
            }
            float d_log_m = hsum(acc) * m;
#else
            float acc = 0.f;
            for (int i = 0; i < 16; i++) {
                float u = x[at + i] / m, q = E2M1[e2m1_encode(u)];
                int inside = fabsf(u) <= 6.f;
                acc += grad[at + i] * (q - (inside ? u : 0.f));
                grad_x[at + i] = inside ? grad[at + i] : 0.f;
            }
            float d_log_m = acc * m;
#endif
            grad_log_scales[r * blocks + b] = (s >= 0x1p-9f && s <= 448.f) ? d_log_m * (s / s8) : 0.f;
        }
    }
}

#ifdef __AVX2__
// exp(x) for x <= 0 (logits minus their row max): 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by its degree-7 Taylor polynomial (truncation < 1e-8 relative); exactly 0 below -87 (2^n subnormal).
static inline __m256 exp8_nonpositive(__m256 x) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2 split in two for an exact n * hi
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
}

static inline float hmax_all(const float *v, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(v + j));
    float out = hmax(m);
    for (; j < n; j++) out = fmaxf(out, v[j]);
    return out;
}
#endif

// Per row of teacher logits t and student logits s [rows, cols]: kl = KL(softmax(t) || softmax(s)) at T=1
// and, where grad is not NULL, its gradient w.r.t. s, softmax(s) - softmax(t). Each row is read from
// memory once: its maxima, then the exps (kept in grad and a per-thread row) and three sums, then the
// gradient from the cached exps. KL = sum p (t - s) - logsumexp(t) + logsumexp(s), the sums in double.
void kl_rows(const float *t, const float *s, float *kl, float *grad, int64_t rows, int64_t cols) {
#pragma omp parallel
    {
        float *teacher_exp = grad ? malloc(cols * sizeof(float)) : NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *tr = t + r * cols, *sr = s + r * cols;
            float *gr = grad ? grad + r * cols : NULL;
            double zt = 0, zs = 0, dot = 0;
            int64_t j = 0;
#ifdef __AVX2__
            float mt = hmax_all(tr, cols), ms = hmax_all(sr, cols);
            __m256 vmt = _mm256_set1_ps(mt), vms = _mm256_set1_ps(ms);
            __m256 azt = _mm256_setzero_ps(), azs = _mm256_setzero_ps(), adot = _mm256_setzero_ps();
            for (; j + 8 <= cols; j += 8) {  // 8-lane float partial sums, flushed to double every 1024 columns
                __m256 vt = _mm256_loadu_ps(tr + j), vs = _mm256_loadu_ps(sr + j);
                __m256 et = exp8_nonpositive(_mm256_sub_ps(vt, vmt)), es = exp8_nonpositive(_mm256_sub_ps(vs, vms));
                azt = _mm256_add_ps(azt, et);
                azs = _mm256_add_ps(azs, es);
                adot = _mm256_fmadd_ps(et, _mm256_sub_ps(vt, vs), adot);
                if (gr) {
                    _mm256_storeu_ps(teacher_exp + j, et);
                    _mm256_storeu_ps(gr + j, es);
                }
                if ((j & 1023) == 1016) {
                    zt += hsum(azt), zs += hsum(azs), dot += hsum(adot);
                    azt = azs = adot = _mm256_setzero_ps();
                }
            }
            zt += hsum(azt), zs += hsum(azs), dot += hsum(adot);
#else
            float mt = -INFINITY, ms = -INFINITY;
            for (int64_t i = 0; i < cols; i++) mt = fmaxf(mt, tr[i]), ms = fmaxf(ms, sr[i]);
#endif
            for (; j < cols; j++) {
                float et = expf(tr[j] - mt), es = expf(sr[j] - ms);
                zt += et, zs += es, dot += (double)et * (tr[j] - sr[j]);
                if (gr) teacher_exp[j] = et, gr[j] = es;
            }
            kl[r] = (float)(dot / zt - (mt + log(zt)) + (ms + log(zs)));
            if (gr) {
                float inv_zt = (float)(1 / zt), inv_zs = (float)(1 / zs);
                for (int64_t i = 0; i < cols; i++) gr[i] = gr[i] * inv_zs - teacher_exp[i] * inv_zt;
            }
        }
        free(teacher_exp);
    }
}

void nvfp4_set_threads(int threads) {
#ifdef _OPENMP
    extern void omp_set_num_threads(int);
    omp_set_num_threads(threads);
#endif
}

// One new token per sequence b: its keys and values k, v [batch, kv_heads, dim] go to position positions[b] of cache
// slot slots[b] (caches [slots, kv_heads, max_len, dim]), then out[b, h] = softmax(scale * q[b, h] . K[0..pos]) V[0..pos]
// for each query head h, reading kv head h / (heads / kv_heads). Each (sequence, head) is computed on its own, the same
// whatever the batch.
#ifdef __AVX2__
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = hsum(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}
#else
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}
#endif

void decode_attention(const float *q, const float *k, const float *v, float *k_cache, float *v_cache,
                      const int64_t *slots, const int64_t *positions, float scale, float *out, int64_t batch,
                      int64_t heads, int64_t kv_heads, int64_t max_len, int64_t dim) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t g = 0; g < kv_heads; g++) {
            int64_t at = ((slots[b] * kv_heads + g) * max_len + positions[b]) * dim;
            memcpy(k_cache + at, k + (b * kv_heads + g) * dim, dim * sizeof(float));
            memcpy(v_cache + at, v + (b * kv_heads + g) * dim, dim * sizeof(float));
        }
    int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(dynamic)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        int64_t b = bh / heads, h = bh % heads, length = positions[b] + 1;
        const float *keys = k_cache + (slots[b] * kv_heads + h / group) * max_len * dim;
        const float *values = v_cache + (slots[b] * kv_heads + h / group) * max_len * dim;
        const float *query = q + bh * dim;
        float *weights = malloc(length * sizeof(float)), *o = out + bh * dim, top = -INFINITY, total = 0.f;
        for (int64_t t = 0; t < length; t++) {
            weights[t] = dot_f32(query, keys + t * dim, dim) * scale;
            top = weights[t] > top ? weights[t] : top;
        }
        for (int64_t t = 0; t < length; t++) total += (weights[t] = expf(weights[t] - top));
        memset(o, 0, dim * sizeof(float));
        for (int64_t t = 0; t < length; t++) {
            float w = weights[t] / total;
            for (int64_t d = 0; d < dim; d++) o[d] += w * values[t * dim + d];
        }
        free(weights);
    }
}
