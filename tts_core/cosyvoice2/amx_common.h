/* What the AMX kernels (attention_bf16.c, gemm_bf16.c) share: the tile state's permission and
 * configuration, bfloat16 widening and a vector 2^x. Included by both; native_build keys a
 * built kernel on the headers beside it as well as its source. */
#ifndef TTS_AMX_COMMON_H
#define TTS_AMX_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
} TileConfig;

/* Asks the kernel for the AMX tile state (once per process; PyTorch's oneDNN asks too):
 * 0, or 1 where it is refused. */
static inline int request_amx(void) {
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? 1 : 0;
}

/* This thread's tile configuration into ``saved``, then all 8 tiles as 16 rows x 64 bytes.
 * PyTorch's oneDNN kernels run between calls on the same threads, so each call restores what
 * it found (restore_tiles). */
static inline void configure_tiles(TileConfig *saved) {
  TileConfig config __attribute__((aligned(64)));
  _tile_storeconfig(saved);
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; t++) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

static inline void restore_tiles(const TileConfig *saved) {
  if (saved->palette)
    _tile_loadconfig(saved);
  else
    _tile_release();
}

static inline __m512 bf16_to_f32(const uint16_t *src) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* 2^x for finite x up to about 127: round to nearest, then a degree-6 Taylor polynomial of
 * e^(f ln 2) on |f| <= 1/2 (relative error about 1.2e-7); scalef takes the exponent whole, so
 * below -149 the result is 0. No clamping or masking: for callers whose inputs are finite. */
static inline __m512 exp2_finite(__m512 x) {
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.693147180559945f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

/* 2^x with x clamped to [-126, 126] first (infinite inputs give finite results). */
static inline __m512 exp2_clamped(__m512 x) {
  return exp2_finite(
      _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f)));
}

/* 2^x for x <= 0, exactly 0 below -126 (hidden keys give -inf). */
static inline __m512 exp2_nonpositive(__m512 x) {
  __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, exp2_clamped(x));
}

#endif
