/* Attention over bfloat16 queries, keys and values for the flow estimator's chunk runs, on
 * AMX tiles.
 *
 * o[b, i, h] = softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h] over the keys j in
 * [key_begin[i], key_end[i]), for heads of 64 channels side by side in each row.
 *
 * Why: a streamed chunk has a few dozen queries and a few hundred keys per head. PyTorch's flash
 * kernel spends most of such a call setting up (110-190 us for 26 queries x 176 keys x 2 x 8
 * heads on two cores); AVX-512 BF16 dot products alone are too slow to win (32 products an
 * instruction against 8192 for an AMX tile product).
 *
 * Work is split over (batch, head) pairs on the OpenMP threads PyTorch runs (both load
 * libgomp.so.1, so one pool serves both). For a pair:
 *  - keys are transposed into the tile layout of the right operand (16 keys x 32 channel pairs
 *    a tile, two tiles for 64 channels), and values are interleaved by key pairs (the layout
 *    AMX takes for its right operand), once for all the pair's queries;
 *  - per 16 queries: scores = q k^T into float32 tiles, softmax in float32 over each query's
 *    visible keys (the weights then rounded to bfloat16 for the second product, as the flash
 *    kernel does), out = weights v accumulated in float32 tiles, divided by the softmax sum
 *    and rounded to bfloat16 (to nearest even).
 * Each thread's tile configuration is saved on entry and restored on exit (amx_common.h).
 */
#include <stdlib.h>

#include "amx_common.h"

#define HEAD_DIM 64 /* channels per head (the only size this file takes) */
#define TILE 16     /* queries per block, keys per score tile, channels per output tile */
#define KEY_STEP 32 /* keys per product of weights and values */

/* One request's share of a call (the flow packs several requests' frames in one run). All
 * strides in elements; keys index from k (and v). */
typedef struct {
  const uint16_t *q;          /* queries [B, rows, heads * 64] */
  int64_t q_batch, q_row;
  uint16_t *k, *v;            /* keys, values [B, >= keys, heads * 64] (the cache) */
  int64_t k_batch, k_row, v_batch, v_row;
  const uint16_t *new_k, *new_v; /* the rows' own keys/values [B, rows, ...] or NULL: copied */
  int64_t new_batch, new_row;    /* into k/v at rows new_at .. new_at + rows - 1 first */
  int64_t new_at;
  uint16_t *o;                /* outputs [B, rows, heads * 64] */
  int64_t o_batch, o_row;
  int64_t rows, keys;         /* query rows; keys there are (row ranges are clipped to them) */
  const int32_t *key_begin, *key_end; /* per row: visible keys [begin, end) */
} Part;

/* A part with the span of keys its rows see (first .. last - 1), found once per call. */
typedef struct {
  const Part *part;
  int64_t first, last;
} Span;


/* A thread's scratch, kept between calls (grown when a call needs more). */
typedef struct {
  uint32_t *keys_t;   /* [keys / 16][2][16 pairs][16 keys] */
  uint16_t *values_v; /* [keys / 32][4][16 key pairs][32] */
  float *scores;      /* [16][keys] */
  uint16_t *weights;  /* [16][keys] */
  int64_t capacity;   /* keys (a multiple of KEY_STEP) */
} Scratch;

static __thread Scratch scratch;

static int reserve(int64_t keys) {
  if (keys <= scratch.capacity) return 0;
  free(scratch.keys_t);
  free(scratch.values_v);
  free(scratch.scores);
  free(scratch.weights);
  scratch.keys_t = aligned_alloc(64, (size_t)keys * HEAD_DIM * 2);
  scratch.values_v = aligned_alloc(64, (size_t)keys * HEAD_DIM * 2);
  scratch.scores = aligned_alloc(64, (size_t)keys * TILE * 4);
  scratch.weights = aligned_alloc(64, (size_t)keys * TILE * 2);
  if (!scratch.keys_t || !scratch.values_v || !scratch.scores || !scratch.weights) {
    free(scratch.keys_t);
    free(scratch.values_v);
    free(scratch.scores);
    free(scratch.weights);
    memset(&scratch, 0, sizeof scratch);
    return 1;
  }
  scratch.capacity = keys;
  return 0;
}

/* 16 x 16 32-bit transpose in registers: r[i][j] -> r[j][i]. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  /* u[4g + j]: rows 4g..4g+3, column 4L + j in 128-bit lane L */
  for (int g = 0; g < 4; g++) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; j++) {
    __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    __m512i b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    __m512i d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);      /* column j */
    r[8 + j] = _mm512_shuffle_i32x4(a, c, 0xdd);  /* column 8 + j */
    r[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);  /* column 4 + j */
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xdd); /* column 12 + j */
  }
}

/* Keys first .. first + padded - 1 of one head (zeros past ``count``) into the right-operand
 * layout of q k^T: per 16 keys and 32 channels, row c holds channel pair c of the 16 keys. */
static void prepare_keys(const uint16_t *keys, int64_t row_stride, int64_t count,
                         int64_t padded, uint32_t *out) {
  for (int64_t j0 = 0; j0 < padded; j0 += TILE) {
    for (int half = 0; half < 2; half++) {
      __m512i r[16];
      for (int n = 0; n < TILE; n++)
        r[n] = j0 + n < count
            ? _mm512_loadu_si512(keys + (j0 + n) * row_stride + half * 32)
            : _mm512_setzero_si512();
      transpose16(r);
      uint32_t *tile = out + (j0 / TILE * 2 + half) * TILE * TILE;
      for (int c = 0; c < TILE; c++) _mm512_store_si512(tile + c * TILE, r[c]);
    }
  }
}

/* Values of one head into the right-operand layout of weights v: per 32 keys and 16
 * channels, row p holds keys 2p and 2p + 1 interleaved channel by channel. */
static void prepare_values(const uint16_t *values, int64_t row_stride, int64_t count,
                           int64_t padded, uint16_t *out) {
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                       40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1,
                                       32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < padded; j += 2) {
    __m512i even[2], odd[2];
    for (int half = 0; half < 2; half++) {
      even[half] = j < count ? _mm512_loadu_si512(values + j * row_stride + half * 32)
                             : _mm512_setzero_si512();
      odd[half] = j + 1 < count ? _mm512_loadu_si512(values + (j + 1) * row_stride + half * 32)
                                : _mm512_setzero_si512();
    }
    uint16_t *base = out + (j / KEY_STEP) * 4 * TILE * 32 + (j % KEY_STEP) / 2 * 32;
    for (int d = 0; d < 4; d++) {
      const __m512i *index = d % 2 ? &high : &low;
      _mm512_store_si512(base + d * TILE * 32,
                         _mm512_permutex2var_epi16(even[d / 2], *index, odd[d / 2]));
    }
  }
}

/* Softmax of one query's scores over keys [lo, hi) of ``padded`` (scaled by factor, in log2
 * units), as bfloat16 weights (0 elsewhere); returns 1 / sum, or 0 when it sees no key.
 * Only the vectors holding key lo and key hi - 1 need a mask; vectors wholly outside the range
 * get zeros without being read. The scale joins the exponent's fma (factor > 0, so the largest
 * score scaled is the largest scaled score). Every key's weight is computed the same way
 * whichever vector it falls in, so a row's weights do not depend on its block's key span. */
static float softmax_row(const float *scores, uint16_t *weights, int64_t padded, int64_t lo,
                         int64_t hi, float factor) {
  if (hi <= lo) {
    memset(weights, 0, (size_t)padded * 2);
    return 0.0f;
  }
  const int64_t first = lo / 16 * 16, last = (hi + 15) / 16 * 16; /* vectors touching it */
  if (first > 0) memset(weights, 0, (size_t)first * 2);
  if (last < padded) memset(weights + last, 0, (size_t)(padded - last) * 2);
  const __mmask16 head = (__mmask16)(0xffffu << (lo - first));
  const __mmask16 tail = (__mmask16)(0xffffu >> (last - hi));
  const __m512 hidden = _mm512_set1_ps(-__builtin_inff());
  __m512 peak = hidden;
  for (int64_t i = first; i < last; i += 16) {
    __mmask16 seen = (i == first ? head : 0xffff) & (i + 16 == last ? tail : 0xffff);
    peak = _mm512_mask_max_ps(peak, seen, peak, _mm512_load_ps(scores + i));
  }
  const __m512 top = _mm512_set1_ps(-_mm512_reduce_max_ps(peak) * factor);
  const __m512 scale = _mm512_set1_ps(factor);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = first; i < last; i += 16) {
    __mmask16 seen = (i == first ? head : 0xffff) & (i + 16 == last ? tail : 0xffff);
    __m512 e = exp2_finite(_mm512_fmadd_ps(_mm512_load_ps(scores + i), scale, top));
    e = _mm512_maskz_mov_ps(seen, e);
    /* the sum takes the weights as rounded, so they add up to one as used */
    __m256bh rounded = _mm512_cvtneps_pbh(e);
    _mm256_store_si256((__m256i *)(weights + i), (__m256i)rounded);
    total = _mm512_add_ps(total, _mm512_cvtpbh_ps(rounded));
  }
  return 1.0f / _mm512_reduce_add_ps(total);
}

/* Row i's visible keys, clipped to the keys there are. */
static inline void key_range(const Part *p, int64_t i, int64_t *begin, int64_t *end) {
  int64_t a = p->key_begin[i], z = p->key_end[i];
  *begin = a < 0 ? 0 : a;
  *end = z > p->keys ? p->keys : z;
}

/* The rows' own keys and values of batch b, head h into the cache. */
static void store_new(const Part *p, int64_t b, int64_t h) {
  if (!p->new_k) return;
  for (int64_t i = 0; i < p->rows; i++) {
    const int64_t at = p->new_at + i;
    memcpy(p->k + b * p->k_batch + at * p->k_row + h * HEAD_DIM,
           p->new_k + b * p->new_batch + i * p->new_row + h * HEAD_DIM, HEAD_DIM * 2);
    memcpy(p->v + b * p->v_batch + at * p->v_row + h * HEAD_DIM,
           p->new_v + b * p->new_batch + i * p->new_row + h * HEAD_DIM, HEAD_DIM * 2);
  }
}

/* The keys a part's rows see together: [first, last), both 0 when none. */
static Span key_span(const Part *p) {
  Span span = {p, INT64_MAX, 0};
  for (int64_t i = 0; i < p->rows; i++) {
    int64_t a, z;
    key_range(p, i, &a, &z);
    if (z <= a) continue;
    if (a < span.first) span.first = a;
    if (z > span.last) span.last = z;
  }
  if (span.first >= span.last) span.first = span.last = 0;
  return span;
}

/* All queries of one part's batch b, head h. */
static void attend_head(const Span *span, float scale, int64_t b, int64_t h) {
  const Part *p = span->part;
  const int64_t first = span->first, last = span->last;
  store_new(p, b, h);
  const int64_t padded = (last - first + KEY_STEP - 1) / KEY_STEP * KEY_STEP;
  prepare_keys(p->k + b * p->k_batch + first * p->k_row + h * HEAD_DIM, p->k_row, last - first,
               padded, scratch.keys_t);
  prepare_values(p->v + b * p->v_batch + first * p->v_row + h * HEAD_DIM, p->v_row,
                 last - first, padded, scratch.values_v);
  const float factor = scale * 1.4426950408889634f;
  uint16_t queries[TILE * HEAD_DIM] __attribute__((aligned(64)));
  float out[TILE * HEAD_DIM] __attribute__((aligned(64)));
  float inverse[TILE];
  for (int64_t r0 = 0; r0 < p->rows; r0 += TILE) {
    const int count = p->rows - r0 < TILE ? (int)(p->rows - r0) : TILE;
    /* this block's keys: whole 32-key steps covering its rows' ranges */
    int64_t lo = INT64_MAX, hi = 0;
    int64_t begin[TILE], end[TILE];
    for (int r = 0; r < count; r++) {
      int64_t a, z;
      key_range(p, r0 + r, &a, &z);
      begin[r] = a;
      end[r] = z;
      if (z <= a) continue;
      if (a < lo) lo = a;
      if (z > hi) hi = z;
    }
    if (lo >= hi) lo = hi = first;
    const int64_t k0 = (lo - first) / KEY_STEP * KEY_STEP;
    const int64_t k1 = (hi - first + KEY_STEP - 1) / KEY_STEP * KEY_STEP;
    const int64_t width = k1 - k0;
    for (int r = 0; r < TILE; r++) {
      if (r < count)
        memcpy(queries + r * HEAD_DIM,
               p->q + b * p->q_batch + (r0 + r) * p->q_row + h * HEAD_DIM, HEAD_DIM * 2);
      else
        memset(queries + r * HEAD_DIM, 0, HEAD_DIM * 2);
    }
    _tile_loadd(4, queries, HEAD_DIM * 2);
    _tile_loadd(5, queries + 32, HEAD_DIM * 2);
    for (int64_t j = k0; j < k1; j += TILE) {
      const uint32_t *keys = scratch.keys_t + j / TILE * 2 * TILE * TILE;
      _tile_zero(0);
      _tile_loadd(6, keys, TILE * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, keys + TILE * TILE, TILE * 4);
      _tile_dpbf16ps(0, 5, 7);
      _tile_stored(0, scratch.scores + (j - k0), width * 4);
    }
    for (int r = 0; r < TILE; r++) {
      if (r < count)
        inverse[r] = softmax_row(scratch.scores + r * width, scratch.weights + r * width,
                                 width, begin[r] - first - k0, end[r] - first - k0, factor);
      else
        memset(scratch.weights + r * width, 0, (size_t)width * 2);
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = k0; j < k1; j += KEY_STEP) {
      const uint16_t *values = scratch.values_v + j / KEY_STEP * 4 * TILE * 32;
      _tile_loadd(4, scratch.weights + (j - k0), width * 2);
      _tile_loadd(6, values, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, values + TILE * 32, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(6, values + 2 * TILE * 32, 64);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(7, values + 3 * TILE * 32, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, out, HEAD_DIM * 4);
    _tile_stored(1, out + 16, HEAD_DIM * 4);
    _tile_stored(2, out + 32, HEAD_DIM * 4);
    _tile_stored(3, out + 48, HEAD_DIM * 4);
    for (int r = 0; r < count; r++) {
      uint16_t *dst = p->o + b * p->o_batch + (r0 + r) * p->o_row + h * HEAD_DIM;
      const __m512 inv = _mm512_set1_ps(inverse[r]);
      for (int c = 0; c < HEAD_DIM; c += 16)
        _mm256_storeu_si256((__m256i *)(dst + c),
                            (__m256i)_mm512_cvtneps_pbh(
                                _mm512_mul_ps(_mm512_load_ps(out + r * HEAD_DIM + c), inv)));
    }
  }
}

int tts_attention_head_dim(void) { return HEAD_DIM; }

int tts_attention_init(void) { return request_amx(); }

/* Attention for every part, their (batch, head) pairs spread over the threads. Returns 0, or
 * 1 when memory for the spans or the scratch could not be had. */
int tts_attention_bf16(const Part *parts, int64_t count, int64_t batch, int64_t heads,
                       float scale, int threads) {
  Span *spans = malloc((size_t)(count > 0 ? count : 1) * sizeof(Span));
  if (!spans) return 1;
  int64_t keys = 0;
  for (int64_t i = 0; i < count; i++) {
    spans[i] = key_span(&parts[i]);
    if (spans[i].last - spans[i].first > keys) keys = spans[i].last - spans[i].first;
  }
  keys = (keys + KEY_STEP - 1) / KEY_STEP * KEY_STEP;
  const int64_t pairs = batch * heads;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    TileConfig saved __attribute__((aligned(64)));
    failed = reserve(keys + KEY_STEP);
    configure_tiles(&saved);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < count * pairs; u++) {
      const int64_t bh = u % pairs;
      if (!failed) attend_head(&spans[u / pairs], scale, bh / heads, bh % heads);
    }
    restore_tiles(&saved);
  }
  free(spans);
  return failed;
}
