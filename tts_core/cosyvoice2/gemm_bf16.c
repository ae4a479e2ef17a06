/* bfloat16 matrix products on AMX tiles for the flow estimator's small-row linears.
 *
 * y[m, n] = res[m, n] + act(sum_k x[m, k] w[n, k] + bias[n]), x, y and the optional residual
 * res bfloat16 (row strides given), the optional bias bfloat16 or float32; sums, bias,
 * activation and residual in float32, rounded once to bfloat16 (to nearest even) at the end;
 * act is none, GELU (erf) or GELU (tanh).
 *
 * Why: a chunk step runs ~280 products of a few dozen rows (26-300) by weights of 256-1536
 * columns. oneDNN's packed kernel takes 35-60 us for 52 x 256 x 1536 on two cores, several
 * times the tile arithmetic (about 10 us); most of that is per-call set-up. Here the weights are
 * laid out once in the tile layout (pack), and a call is one OpenMP loop over 32 x 32 output
 * blocks, each a run of tile products over k.
 *
 * Packed weight: for every 16 output channels (n tile) and 32 inputs (k step), the 16 x 32
 * block in AMX's right-operand layout: row r holds input pair (2r, 2r+1) of each of the 16
 * channels, 1 KB; blocks ordered n tile major, so one tile's k run is contiguous.
 * Requires k % 32 == 0 and n % 16 == 0.
 *
 * Also here: the row-wise LayerNorm of those runs, optionally followed by Mish (the causal
 * blocks' norm and activation), in float32 with one rounding to bfloat16; PyTorch's bfloat16
 * Mish alone took ~40 us a call on a first chunk's 52 x 256.
 */
#include <stdlib.h>

#include "amx_common.h"

#define TILE 16
#define K_STEP 32
#define PREFETCH_STEPS 2 /* k steps of weights requested ahead of the tile loads */

enum { ACT_NONE = 0, ACT_GELU_ERF = 1, ACT_GELU_TANH = 2 };

int tts_gemm_init(void) { return request_amx(); }

/* w [n, k] row-major bfloat16 -> the packed layout above (n * k elements). */
int tts_gemm_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
  if (k % K_STEP || n % TILE || n < 1 || k < 1) return -1;
  int64_t steps = k / K_STEP;
  for (int64_t nt = 0; nt < n / TILE; nt++)
    for (int64_t s = 0; s < steps; s++) {
      uint16_t *block = packed + (nt * steps + s) * TILE * K_STEP;
      for (int r = 0; r < TILE; r++)
        for (int c = 0; c < TILE; c++)
          for (int p = 0; p < 2; p++)
            block[r * K_STEP + 2 * c + p] = w[(nt * TILE + c) * k + s * K_STEP + 2 * r + p];
    }
  return 0;
}

/* 1 / x: the 14-bit estimate and one Newton step (about 2^-28 relative; a division costs
 * several times as much and dominated the GELU products). */
static inline __m512 reciprocal(__m512 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}

/* erf(|x|) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), sign restored. */
static inline __m512 erf_approx(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 t = reciprocal(_mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a,
                                              _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = exp2_nonpositive(
      _mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-1.4426950408889634f)));
  const __m512 y = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(y),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
}

/* tanh(x) = 1 - 2 / (e^{2x} + 1), computed on -|x| so the exponential stays <= 1. */
static inline __m512 tanh_approx(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 e = exp2_nonpositive(_mm512_mul_ps(a, _mm512_set1_ps(-2.8853900817779268f)));
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e),
                                 reciprocal(_mm512_add_ps(_mm512_set1_ps(1.0f), e)));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(y),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
}

static inline __m512 activate(__m512 v, int activation) {
  const __m512 half = _mm512_set1_ps(0.5f);
  if (activation == ACT_GELU_ERF)
    return _mm512_mul_ps(_mm512_mul_ps(half, v),
                         _mm512_add_ps(_mm512_set1_ps(1.0f),
                                       erf_approx(_mm512_mul_ps(v, _mm512_set1_ps(
                                           0.70710678118654752f)))));
  if (activation == ACT_GELU_TANH) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, v));
    return _mm512_mul_ps(_mm512_mul_ps(half, v),
                         _mm512_add_ps(_mm512_set1_ps(1.0f), tanh_approx(inner)));
  }
  return v;
}

typedef struct {
  const void *bias;
  int bias_bf16, activation;
  const uint16_t *residual;
  int64_t ldr;
  uint16_t *y;
  int64_t ldy;
} Epilogue;

/* Sums of one 16 x 16 tile (in ``sums``, row stride 16) -> bias, activation, residual,
 * bfloat16 rows row0 .. row0 + rows - 1, channels col0 .. col0 + 15 of y. */
static void finish_tile(const float *sums, int rows, const Epilogue *e, int64_t row0,
                        int64_t col0) {
  __m512 b = _mm512_setzero_ps();
  if (e->bias)
    b = e->bias_bf16 ? bf16_to_f32((const uint16_t *)e->bias + col0)
                     : _mm512_loadu_ps((const float *)e->bias + col0);
  for (int r = 0; r < rows; r++) {
    __m512 v = activate(_mm512_add_ps(_mm512_load_ps(sums + r * TILE), b), e->activation);
    if (e->residual) v = _mm512_add_ps(v, bf16_to_f32(e->residual + (row0 + r) * e->ldr + col0));
    _mm256_storeu_si256((__m256i *)(e->y + (row0 + r) * e->ldy + col0),
                        (__m256i)_mm512_cvtneps_pbh(v));
  }
}

/* y = res + act(x w^T + bias): x [m, k] (row stride ldx), packed w (n, k), bias [n] (bfloat16
 * when bias_bf16, else float32) or NULL, residual [m, n] (row stride ldr) or NULL, y [m, n]
 * (row stride ldy; may be the residual itself). Returns 0, -1 for shapes it does not take, -2
 * without memory. */
int tts_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, const uint16_t *packed,
                  int64_t n, const void *bias, int bias_bf16, int activation,
                  const uint16_t *residual, int64_t ldr, uint16_t *y, int64_t ldy,
                  int threads) {
  if (k % K_STEP || n % TILE || m < 0 || k < 1 || n < 1 || activation < 0 || activation > 2)
    return -1;
  const Epilogue epilogue = {bias, bias_bf16, activation, residual, ldr, y, ldy};
  if (m == 0) return 0;
  const int64_t steps = k / K_STEP;
  const int64_t m_tiles = (m + TILE - 1) / TILE, n_tiles = n / TILE;
  /* the last rows, when fewer than 16, in a zero-padded copy (a tile load reads 16 rows) */
  const int tail = (int)(m % TILE);
  uint16_t *padded = NULL;
  if (tail) {
    padded = aligned_alloc(64, (size_t)TILE * k * 2);
    if (!padded) return -2;
    memset(padded, 0, (size_t)TILE * k * 2);
    for (int r = 0; r < tail; r++)
      memcpy(padded + r * k, x + (m - tail + r) * ldx, (size_t)k * 2);
  }
  const int64_t m_pairs = (m_tiles + 1) / 2, n_pairs = (n_tiles + 1) / 2;
#pragma omp parallel num_threads(threads)
  {
    TileConfig saved __attribute__((aligned(64)));
    float sums[4][TILE * TILE] __attribute__((aligned(64)));
    configure_tiles(&saved);
#pragma omp for schedule(static) collapse(2)
    for (int64_t np = 0; np < n_pairs; np++) {
      for (int64_t mp = 0; mp < m_pairs; mp++) {
        const int64_t mt0 = 2 * mp, nt0 = 2 * np;
        const int two_m = mt0 + 1 < m_tiles, two_n = nt0 + 1 < n_tiles;
        const uint16_t *a0, *a1 = NULL;
        int64_t lda0 = ldx, lda1 = ldx;
        if (tail && mt0 == m_tiles - 1) {
          a0 = padded;
          lda0 = k;
        } else {
          a0 = x + mt0 * TILE * ldx;
        }
        if (two_m) {
          if (tail && mt0 + 1 == m_tiles - 1) {
            a1 = padded;
            lda1 = k;
          } else {
            a1 = x + (mt0 + 1) * TILE * ldx;
          }
        }
        const uint16_t *b0 = packed + nt0 * steps * TILE * K_STEP;
        const uint16_t *b1 = b0 + steps * TILE * K_STEP;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; s++) {
          if (s + PREFETCH_STEPS < steps) { /* weights stream from memory: ask ahead */
            const char *next0 = (const char *)(b0 + (s + PREFETCH_STEPS) * TILE * K_STEP);
            const char *next1 = (const char *)(b1 + (s + PREFETCH_STEPS) * TILE * K_STEP);
            for (int line = 0; line < 1024; line += 64) {
              _mm_prefetch(next0 + line, _MM_HINT_T0);
              if (two_n) _mm_prefetch(next1 + line, _MM_HINT_T0);
            }
          }
          _tile_loadd(4, a0 + s * K_STEP, lda0 * 2);
          _tile_loadd(6, b0 + s * TILE * K_STEP, 64);
          _tile_dpbf16ps(0, 4, 6);
          if (two_n) {
            _tile_loadd(7, b1 + s * TILE * K_STEP, 64);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two_m) {
            _tile_loadd(5, a1 + s * K_STEP, lda1 * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (two_n) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], TILE * 4);
        if (two_n) _tile_stored(1, sums[1], TILE * 4);
        if (two_m) _tile_stored(2, sums[2], TILE * 4);
        if (two_m && two_n) _tile_stored(3, sums[3], TILE * 4);
        for (int i = 0; i < 2; i++) {
          if (i && !two_m) break;
          const int64_t row0 = (mt0 + i) * TILE;
          const int rows = m - row0 < TILE ? (int)(m - row0) : TILE;
          for (int j = 0; j < 2; j++) {
            if (j && !two_n) break;
            finish_tile(sums[2 * i + j], rows, &epilogue, row0, (nt0 + j) * TILE);
          }
        }
      }
    }
    restore_tiles(&saved);
  }
  free(padded);
  return 0;
}

/* mish(x) = x tanh(softplus(x)) = x (e^2x + 2e^x) / (e^2x + 2e^x + 2); x itself above 20
 * (where the fraction is 1 in float32). */
static inline __m512 mish(__m512 x) {
  const __m512 e = exp2_clamped(_mm512_mul_ps(_mm512_min_ps(x, _mm512_set1_ps(20.0f)),
                                              _mm512_set1_ps(1.4426950408889634f)));
  const __m512 num = _mm512_fmadd_ps(e, e, _mm512_add_ps(e, e));
  const __m512 frac = _mm512_div_ps(num, _mm512_add_ps(num, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(x, frac);
}

/* out[r] = act(LayerNorm(x[r]) * gamma + beta) for rows of ``width`` channels (a multiple of 16,
 * at most 1024), bfloat16 in and out (row strides given), gamma/beta bfloat16 (or NULL: 1 and
 * 0); act: 0 none, 1 Mish. Returns 0, -1 for a width it does not take. */
int tts_layer_norm_bf16(const uint16_t *x, int64_t ldx, int64_t rows, int64_t width,
                        const uint16_t *gamma, const uint16_t *beta, float eps, int activation,
                        uint16_t *out, int64_t ldo, int threads) {
  if (width % 16 || width < 16 || width > 1024 || activation < 0 || activation > 1) return -1;
  const int vectors = (int)(width / 16);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    __m512 v[64];
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < vectors; i++) {
      v[i] = bf16_to_f32(x + r * ldx + 16 * i);
      sum = _mm512_add_ps(sum, v[i]);
    }
    const float mean = _mm512_reduce_add_ps(sum) / (float)width;
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < vectors; i++) {
      v[i] = _mm512_sub_ps(v[i], _mm512_set1_ps(mean));
      squares = _mm512_fmadd_ps(v[i], v[i], squares);
    }
    const float variance = _mm512_reduce_add_ps(squares) / (float)width;
    const __m512 scale = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(variance + eps))));
    for (int i = 0; i < vectors; i++) {
      __m512 y = _mm512_mul_ps(v[i], scale);
      if (gamma) y = _mm512_mul_ps(y, bf16_to_f32(gamma + 16 * i));
      if (beta) y = _mm512_add_ps(y, bf16_to_f32(beta + 16 * i));
      if (activation == 1) y = mish(y);
      _mm256_storeu_si256((__m256i *)(out + r * ldo + 16 * i), (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
  return 0;
}
