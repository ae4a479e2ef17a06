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
#include <string.h>

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

/* ---- One Qwen2 decoder layer for decode rows (each one new position of its own request) ----
 *
 * Why: a decode step's weights take ~16 ms to read on two cores, and the rest of the layer
 * (norms, rotary, cache writes, attention, SiLU, residuals) cost ~6 ms more as some 3000 small
 * PyTorch calls (2-10 us each, mostly dispatch). Here it is one call per layer, in float32, the
 * products on the kernel above.
 *
 *   x += o(attention(rotary(qkv(rms(x)))));  x += down(silu(gate) * up)(rms(x))
 */

typedef struct {
  const int8_t *weight; /* [n, k] */
  const float *scale;   /* [n] */
  const float *bias;    /* [n] or NULL */
  int64_t n, k;
} QuantLinear;

typedef struct {
  const float *input_norm, *post_norm; /* RMSNorm weights [dim] */
  float eps;
  QuantLinear qkv, out, gate_up, down; /* q, k, v heads side by side; gate, up side by side */
  int64_t heads, kv_heads, head_dim;
} DecoderLayer;

typedef struct {
  float *keys, *values; /* the row's cache of this layer: [kv_heads][capacity][head_dim] */
  int64_t head_stride;  /* capacity * head_dim */
  int64_t position;     /* where the new key/value go: the keys cached before it */
} RowCache;

/* e^x for 16 lanes: 2^n 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its Taylor series to
 * the 7th power (error below 1e-8, under float32's rounding); scalef gives 0 / inf out of range
 * and keeps NaN. */
static inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5252734e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* out[m] = w * x[m] / sqrt(mean(x[m]^2) + eps); dim a multiple of 16. */
static void rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps,
                     float *out) {
  for (int64_t m = 0; m < rows; m++) {
    const float *row = x + m * dim;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
      __m512 v = _mm512_loadu_ps(row + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inverse = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps);
    const __m512 s = _mm512_set1_ps(inverse);
    for (int64_t i = 0; i < dim; i += 16)
      _mm512_storeu_ps(out + m * dim + i, _mm512_mul_ps(_mm512_loadu_ps(w + i),
                                                        _mm512_mul_ps(_mm512_loadu_ps(row + i), s)));
  }
}

/* Rotate one head in place (the "rotate half" layout): v[i] cos[i] + v[i +- half] sin[i], with
 * sin's first half negated (qwen2.rotary_cos_sin). */
static void rotate(float *v, const float *cos, const float *sin, int64_t head_dim) {
  float turned[256];
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < head_dim; i++) turned[i] = v[(i + half) % head_dim];
  for (int64_t i = 0; i < head_dim; i++) v[i] = v[i] * cos[i] + turned[i] * sin[i];
}

static float dot(const float *a, const float *b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

/* The query heads of kv head g of one row against its cache (the new key included): softmax
 * of the scaled scores, then the weighted sum of the values, into out [heads * head_dim]. */
static int attend(const float *qkv, const DecoderLayer *L, const RowCache *c, int64_t g,
                  float *out) {
  const int64_t hd = L->head_dim, group = L->heads / L->kv_heads, keys = c->position + 1;
  const float *k = c->keys + g * c->head_stride, *v = c->values + g * c->head_stride;
  const float scale = 1.0f / sqrtf((float)hd);
  float *scores = aligned_alloc(64, (size_t)(keys + 16) * sizeof(float));
  if (!scores) return 1;
  for (int64_t j = 0; j < group; j++) {
    const int64_t h = g * group + j;
    const float *q = qkv + h * hd;
    float peak = -INFINITY;
    for (int64_t t = 0; t < keys; t++) {
      scores[t] = dot(q, k + t * hd, hd) * scale;
      peak = scores[t] > peak ? scores[t] : peak;
    }
    int64_t t = 0;
    __m512 total = _mm512_setzero_ps();
    for (; t + 16 <= keys; t += 16) {
      __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(peak)));
      _mm512_storeu_ps(scores + t, e);
      total = _mm512_add_ps(total, e);
    }
    if (t < keys) {
      const __mmask16 tail = (__mmask16)((1u << (keys - t)) - 1);
      __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + t),
                                      _mm512_set1_ps(peak)));
      e = _mm512_maskz_mov_ps(tail, e);
      _mm512_mask_storeu_ps(scores + t, tail, e);
      total = _mm512_add_ps(total, e);
    }
    const float inverse = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t d = 0; d < hd; d += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = 0; s < keys; s++)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), _mm512_loadu_ps(v + s * hd + d), acc);
      _mm512_storeu_ps(out + h * hd + d, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
    }
  }
  free(scores);
  return 0;
}

static int product(const QuantLinear *p, const float *x, int64_t rows, float *y, int threads) {
  return tts_int8_matvec(x, rows, p->k, p->weight, p->n, p->scale, p->bias, y, threads);
}

/* x [rows, dim] (float32, updated in place) through one decoder layer; cos, sin [rows,
 * head_dim] (qwen2.rotary_cos_sin at each row's position); caches: one per row. Returns 0, -1
 * for shapes it does not take, -2 without memory. */
int tts_int8_decoder_layer(float *x, int64_t rows, int64_t dim, const DecoderLayer *L,
                           const float *cos, const float *sin, const RowCache *caches,
                           int threads) {
  const int64_t hd = L->head_dim, heads = L->heads, kv = L->kv_heads;
  const int64_t width = (heads + 2 * kv) * hd, inner = L->gate_up.n / 2;
  if (rows < 1 || dim % 32 || hd % 16 || hd > 256 || kv < 1 || heads % kv ||
      L->qkv.k != dim || L->qkv.n != width || L->out.k != heads * hd || L->out.n != dim ||
      L->gate_up.k != dim || L->gate_up.n % 2 || inner % 32 || L->down.k != inner ||
      L->down.n != dim)
    return -1;
  const size_t floats = (size_t)rows * (dim + width + heads * hd + dim + 2 * inner + inner);
  float *buffer = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
  if (!buffer) return -2;
  float *normed = buffer, *qkv = normed + rows * dim, *attended = qkv + rows * width;
  float *delta = attended + rows * heads * hd, *gate_up = delta + rows * dim;
  float *hidden = gate_up + rows * 2 * inner;
  int status = 0;

  rms_norm(x, rows, dim, L->input_norm, L->eps, normed);
  if ((status = product(&L->qkv, normed, rows, qkv, threads))) goto done;
  for (int64_t m = 0; m < rows; m++) {
    for (int64_t h = 0; h < heads + kv; h++)  /* q and k heads are adjacent */
      rotate(qkv + m * width + h * hd, cos + m * hd, sin + m * hd, hd);
    const RowCache *c = &caches[m];
    for (int64_t g = 0; g < kv; g++) {
      memcpy(c->keys + g * c->head_stride + c->position * hd,
             qkv + m * width + (heads + g) * hd, (size_t)hd * sizeof(float));
      memcpy(c->values + g * c->head_stride + c->position * hd,
             qkv + m * width + (heads + kv + g) * hd, (size_t)hd * sizeof(float));
    }
  }
  int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
  for (int64_t u = 0; u < rows * kv; u++)
    failed |= attend(qkv + (u / kv) * width, L, &caches[u / kv], u % kv,
                     attended + (u / kv) * heads * hd);
  if (failed) {
    status = -2;
    goto done;
  }
  if ((status = product(&L->out, attended, rows, delta, threads))) goto done;
  for (int64_t i = 0; i < rows * dim; i++) x[i] += delta[i];

  rms_norm(x, rows, dim, L->post_norm, L->eps, normed);
  if ((status = product(&L->gate_up, normed, rows, gate_up, threads))) goto done;
  for (int64_t m = 0; m < rows; m++)
    for (int64_t i = 0; i < inner; i += 16) {
      const __m512 g = _mm512_loadu_ps(gate_up + m * 2 * inner + i);
      const __m512 u = _mm512_loadu_ps(gate_up + m * 2 * inner + inner + i);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      _mm512_storeu_ps(hidden + m * inner + i, _mm512_mul_ps(silu, u));
    }
  if ((status = product(&L->down, hidden, rows, delta, threads))) goto done;
  for (int64_t i = 0; i < rows * dim; i++) x[i] += delta[i];
done:
  free(buffer);
  return status;
}
