/* Weight-only int8 matrix products for decode steps (a few rows), AVX-512 VNNI.
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] * scale[n] + bias[n]
 *
 * x: float32 [rows, k]; w: int8 [n, k] (per output channel scale, float32); y: float32.
 * Each row of x is rounded to int16 on its own scale (max |x| / 16383), then every weight row
 * is widened to int16 and multiplied with vpdpwssd (32 products summed into 16 int32 lanes per
 * instruction). PyTorch's kernel widens each weight to float32 and multiplies in float32: three
 * instructions per 16 weights instead of two per 32, so on two cores it read the weights at
 * about 14 GB/s where this reads them at about 22.
 *
 * Sums stay exact in int32: |x| <= 16383 and |w| <= 127, so a lane gathers k / 16 products of
 * at most 2 080 641 each; k is kept <= 16 384 (2^31 / 2 080 641 = 1032 products a lane, 16 512
 * columns).
 *
 * Rows are taken up to eight at a time, so each weight is read once for up to eight rows. Output
 * channels are split across OpenMP threads (the runtime PyTorch loaded: both name libgomp.so.1,
 * so one pool serves both).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define PREFETCH 1024  /* bytes ahead of each weight row's read */
#define QMAX 16383.0f  /* int16 magnitude the activations are scaled to (see the header) */
#define GROUP 8        /* rows multiplied together (each weight read once for all of them) */

int tts_int8_matvec_max_k(void) { return 16384; }

/* Rounds each row of x to int16 (to nearest, ties to even) and returns its scale; a row holding
 * a NaN or an infinity gets a NaN scale, so its outputs are NaN as a float product's would be. */
static void quantize_rows(const float *x, int64_t rows, int64_t k, int16_t *xq, float *xscale) {
  for (int64_t m = 0; m < rows; m++) {
    const float *row = x + m * k;
    float peak = 0.0f;
    int finite = 1;
    for (int64_t i = 0; i < k; i++) {
      float a = fabsf(row[i]);
      finite &= isfinite(a) != 0;
      peak = a > peak ? a : peak;
    }
    if (!finite) peak = 0.0f; /* quantise zeros; the scale below carries the NaN */
    float scale = peak > 0 ? peak / QMAX : 1.0f;
    float inverse = 1.0f / scale;
    for (int64_t i = 0; i < k; i += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(row + i), _mm512_set1_ps(inverse));
      __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256((__m256i *)(xq + m * k + i), _mm512_cvtsepi32_epi16(q));
    }
    xscale[m] = finite ? scale : NAN;
  }
}

/* ROWS rows by the CHANNELS weight rows from channel n on (fewer at the end); ROWS x CHANNELS
 * accumulators, at most 16 so that they stay in registers beside the inputs. */
#define DEFINE_BLOCK(ROWS, CHANNELS)                                                          \
  static void block_##ROWS(const int16_t *xq, const float *xscale, int64_t k,               \
                           const int8_t *w, int64_t n, int64_t total, const float *scale,   \
                           const float *bias, float *y) {                                   \
    int64_t channels = total - n < CHANNELS ? total - n : CHANNELS;                         \
    __m512i acc[ROWS][CHANNELS];                                                            \
    for (int r = 0; r < ROWS; r++)                                                          \
      for (int c = 0; c < CHANNELS; c++) acc[r][c] = _mm512_setzero_si512();                \
    const int8_t *base = w + n * k;                                                         \
    for (int64_t i = 0; i < k; i += 32) {                                                   \
      __m512i xv[ROWS];                                                                     \
      for (int r = 0; r < ROWS; r++) xv[r] = _mm512_loadu_si512(xq + r * k + i);            \
      for (int c = 0; c < CHANNELS; c++) {                                                  \
        if (c >= channels) break;                                                           \
        const int8_t *p = base + c * k + i;                                                 \
        _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);                            \
        __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));          \
        for (int r = 0; r < ROWS; r++) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], wv, xv[r]); \
      }                                                                                     \
    }                                                                                       \
    for (int r = 0; r < ROWS; r++)                                                          \
      for (int c = 0; c < channels; c++) {                                                  \
        float v = (float)_mm512_reduce_add_epi32(acc[r][c]) * xscale[r] * scale[n + c];     \
        y[r * total + n + c] = bias ? v + bias[n + c] : v;                                  \
      }                                                                                     \
  }
DEFINE_BLOCK(1, 4)
DEFINE_BLOCK(2, 4)
DEFINE_BLOCK(3, 4)
DEFINE_BLOCK(4, 4)
DEFINE_BLOCK(5, 2)
DEFINE_BLOCK(6, 2)
DEFINE_BLOCK(7, 2)
DEFINE_BLOCK(8, 2)

/* Returns 0 on success, -1 for a shape it does not take (k not a multiple of 32, or > MAX_K),
 * -2 when out of memory. */
int tts_int8_matvec(const float *x, int64_t rows, int64_t k, const int8_t *w, int64_t n,
                    const float *scale, const float *bias, float *y, int threads) {
  if (k % 32 || k > tts_int8_matvec_max_k() || rows < 1 || n < 1) return -1;
  int16_t *xq = aligned_alloc(64, (size_t)(rows * k * 2 + 63) / 64 * 64);
  float *xscale = malloc((size_t)rows * sizeof(float));
  if (!xq || !xscale) {
    free(xq);
    free(xscale);
    return -2;
  }
  quantize_rows(x, rows, k, xq, xscale);
  for (int64_t m = 0; m < rows; m += GROUP) {
    int64_t group = rows - m < GROUP ? rows - m : GROUP;
    int64_t step = group > 4 ? 2 : 4; /* the block's channels */
    const int16_t *xg = xq + m * k;
    const float *sg = xscale + m;
    float *yg = y + m * n;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < n; c += step) {
      switch (group) {
        case 1: block_1(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 2: block_2(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 3: block_3(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 4: block_4(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 5: block_5(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 6: block_6(xg, sg, k, w, c, n, scale, bias, yg); break;
        case 7: block_7(xg, sg, k, w, c, n, scale, bias, yg); break;
        default: block_8(xg, sg, k, w, c, n, scale, bias, yg); break;
      }
    }
  }
  free(xq);
  free(xscale);
  return 0;
}
