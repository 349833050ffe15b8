/* llmos compress kernels: quantized llmos_linear fns (see native.py for the layouts). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define LLMOS_X86 1
#endif

/* As in the lm plugin's kernels the hardware prefetcher alone leaves bandwidth unused, more so here:
   widening bytes takes several instructions per cache line, so fewer lines are in flight at once
   than for float32. Rows are contiguous, so 8 KB ahead in one row is a few rows further in the same
   stream (measured: int8 at one row 15% faster than at 4 KB; 16 and 32 KB no better). */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif

/* Quantized activations per chunk of input rows, in bytes: on the stack of whichever thread runs
   the kernel (OpenMP workers, the caller's thread), so kept well under any default stack. */
#define XQ_BYTES (128 * 1024)
#define XQ_ROWS 16

/* The ABI of the lm plugin's kernels (plugins/lm/csrc). */
#include "llmos_linear.h"

#define ADD(m, n) (add ? add[(m) * add_ld + (n)] : 0.0f)

/* Thread t's rows [*n0, *n1) of N, in blocks of 4 so that tiles never straddle two threads. */
static inline void share(int64_t N, int64_t t, int64_t T, int64_t* n0, int64_t* n1) {
  const int64_t blocks = (N + 3) / 4;
  if (T < 1) T = 1;
  *n0 = blocks * t / T * 4;
  *n1 = blocks * (t + 1) / T * 4;
  if (*n1 > N) *n1 = N;
  if (*n0 > N) *n0 = N;
}

/* Rows of x quantized per chunk: XQ_ROWS, or fewer for long rows so the buffer fits XQ_BYTES. */
static inline int64_t chunk_rows(int64_t Kp) {
  int64_t mc = XQ_BYTES / Kp;
  if (mc > XQ_ROWS) mc = XQ_ROWS;
  return mc < 1 ? 1 : mc;
}

/* Every tile function below takes R weight rows x MB input rows; R, MB (<= 4) are constants after
   inlining into these switches, so the accumulators live in registers. */
#define TILE_R(tile, MB, ...)                                                          \
  switch (R) {                                                                        \
    case 4: tile(__VA_ARGS__, n, m, 4, MB); break;                                    \
    case 3: tile(__VA_ARGS__, n, m, 3, MB); break;                                    \
    case 2: tile(__VA_ARGS__, n, m, 2, MB); break;                                    \
    default: tile(__VA_ARGS__, n, m, 1, MB); break;                                   \
  }
#define DISPATCH4(tile, ...)                                                           \
  for (int64_t n = n0; n < n1; n += 4) {                                              \
    const int R = n1 - n < 4 ? (int)(n1 - n) : 4;                                     \
    for (int64_t m = 0; m < M; m += 4) {                                              \
      switch (M - m < 4 ? (int)(M - m) : 4) {                                         \
        case 4: TILE_R(tile, 4, __VA_ARGS__) break;                                   \
        case 3: TILE_R(tile, 3, __VA_ARGS__) break;                                   \
        case 2: TILE_R(tile, 2, __VA_ARGS__) break;                                   \
        default: TILE_R(tile, 1, __VA_ARGS__) break;                                  \
      }                                                                               \
    }                                                                                 \
  }
#define DISPATCH2(tile, ...)                                                           \
  for (int64_t n = n0; n < n1; n += 4) {                                              \
    const int R = n1 - n < 4 ? (int)(n1 - n) : 4;                                     \
    for (int64_t m = 0; m < M; m += 2) {                                              \
      if (M - m >= 2) { TILE_R(tile, 2, __VA_ARGS__) }                                \
      else { TILE_R(tile, 1, __VA_ARGS__) }                                           \
    }                                                                                 \
  }

/* ---- portable scalar kernels -------------------------------------------------------------- */

void llmos_q_int8_scalar(const llmos_linear* l, const float* x, float* y, const float* add,
                         int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K;
  const int8_t* w = (const int8_t*)l->data;
  const float* sc = (const float*)l->scales;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += (float)w[n * K + k] * x[m * K + k];
      y[m * N + n] = ADD(m, n) + s * sc[n];
    }
}

void llmos_q_int4_scalar(const llmos_linear* l, const float* x, float* y, const float* add,
                         int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K, G = l->group, KG = K / G;
  const uint8_t* w = (const uint8_t*)l->data;
  const float* sc = (const float*)l->scales;
  const float* off = (const float*)l->zeros;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const float gs = sc[n * KG + k0 / G], go = off[n * KG + k0 / G];
        for (int j = 0; j < 16; ++j) {
          const uint8_t b = row[k0 / 2 + j];
          s += ((float)(b & 15) * gs - go) * xr[k0 + j];
          s += ((float)(b >> 4) * gs - go) * xr[k0 + 16 + j];
        }
      }
      y[m * N + n] = ADD(m, n) + s;
    }
  }
}

/* sx = max|x| / 127 and q = round-half-even(x / sx) clamped to +-127: division, not a multiply by
   the reciprocal, so q is torch's to the bit. */
static float quant_row_scalar(const float* x, int8_t* q, int64_t K) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float a = fabsf(x[k]);
    amax = a > amax ? a : amax;
  }
  const float sx = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t k = 0; k < K; ++k) {
    float v = nearbyintf(x[k] / sx);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    q[k] = (int8_t)v;
  }
  return sx;
}

void llmos_q_w8a8_scalar(const llmos_linear* l, const float* x, float* y, const float* add,
                         int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K;
  const int8_t* w = (const int8_t*)l->data;
  const float* sc = (const float*)l->scales;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  if (n0 >= n1 || K <= 0) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = ADD(m, n);
    return;
  }
  const int64_t MC = chunk_rows(K);
  int8_t xq[MC * K];
  float sx[XQ_ROWS];
  for (int64_t c = 0; c < M; c += MC) {
    const int64_t mc = M - c < MC ? M - c : MC;
    for (int64_t m = 0; m < mc; ++m) sx[m] = quant_row_scalar(x + (c + m) * K, xq + m * K, K);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < mc; ++m) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += (int32_t)xq[m * K + k] * w[n * K + k];
        y[(c + m) * N + n] = ADD(c + m, n) + (float)s * (sx[m] * sc[n]);
      }
  }
}

#ifdef LLMOS_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define T512I __attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline)) static inline
#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,fma,avx512vnni")))
#define TVNNII __attribute__((target("avx512f,avx512bw,avx512vl,fma,avx512vnni"), always_inline)) static inline
#define T256 __attribute__((target("avx2,fma")))
#define T256I __attribute__((target("avx2,fma"), always_inline)) static inline
#define TAVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define TAVXVNNII __attribute__((target("avx2,fma,avxvnni"), always_inline)) static inline

T256I float hsum256(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

T256I int32_t hsum256i(__m256i v) {
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
  return _mm_cvtsi128_si32(q);
}

/* ---- int8 weight-only ----------------------------------------------------------------------- */

/* One step of 16 weights (w at row n0 + r, column k): widen, then one FMA per input row. With one
   or two input rows a second set of accumulators (odd steps) halves the FMA dependency chains. */
T512I void i8_step512(const float* x, const int8_t* w, int64_t K, int64_t n0, int64_t m0, int64_t k,
                      __m512 acc[4][4], __m512 acc2[4][2], const int R, const int MB, const int odd,
                      __mmask16 mk) {
  __m512 xv[4];
  for (int m = 0; m < MB; ++m)
    xv[m] = mk == 0xffff ? _mm512_loadu_ps(x + (m0 + m) * K + k) : _mm512_maskz_loadu_ps(mk, x + (m0 + m) * K + k);
  for (int r = 0; r < R; ++r) {
    const int8_t* p = w + (n0 + r) * K + k;
    const __m128i b = mk == 0xffff ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(mk, p);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    for (int m = 0; m < MB; ++m) {
      if (MB <= 2 && odd) acc2[r][m] = _mm512_fmadd_ps(wv, xv[m], acc2[r][m]);
      else acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
}

T512I void i8_tile512(const float* x, const int8_t* w, const float* sc, float* y, const float* add,
                      int64_t add_ld, int64_t K, int64_t N, int64_t n0, int64_t m0, const int R,
                      const int MB) {
  __m512 acc[4][4], acc2[4][2];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int m = 0; m < 2; ++m) acc2[r][m] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    i8_step512(x, w, K, n0, m0, k, acc, acc2, R, MB, 0, 0xffff);
    i8_step512(x, w, K, n0, m0, k + 16, acc, acc2, R, MB, 1, 0xffff);
    i8_step512(x, w, K, n0, m0, k + 32, acc, acc2, R, MB, 0, 0xffff);
    i8_step512(x, w, K, n0, m0, k + 48, acc, acc2, R, MB, 1, 0xffff);
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    i8_step512(x, w, K, n0, m0, k, acc, acc2, R, MB, 0, mk);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      __m512 a = MB <= 2 ? _mm512_add_ps(acc[r][m], acc2[r][m]) : acc[r][m];
      y[(m0 + m) * N + n0 + r] = ADD(m0 + m, n0 + r) + _mm512_reduce_add_ps(a) * sc[n0 + r];
    }
}

T512 void llmos_q_int8_avx512(const llmos_linear* l, const float* x, float* y, const float* add,
                              int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K;
  const int8_t* w = (const int8_t*)l->data;
  const float* sc = (const float*)l->scales;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  DISPATCH4(i8_tile512, x, w, sc, y, add, add_ld, K, N)
}

/* AVX2: 16 registers, so 4 weight rows x 2 input rows of accumulators (and 8 weights a step). */
T256I void i8_tile256(const float* x, const int8_t* w, const float* sc, float* y, const float* add,
                      int64_t add_ld, int64_t K, int64_t N, int64_t n0, int64_t m0, const int R,
                      const int MB) {
  __m256 acc[4][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    __m256 xv[2];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      const __m128i b = _mm_loadl_epi64((const __m128i*)(w + (n0 + r) * K + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = hsum256(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += (float)w[(n0 + r) * K + kk] * x[(m0 + m) * K + kk];
      y[(m0 + m) * N + n0 + r] = ADD(m0 + m, n0 + r) + s * sc[n0 + r];
    }
}

T256 void llmos_q_int8_avx2(const llmos_linear* l, const float* x, float* y, const float* add,
                            int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K;
  const int8_t* w = (const int8_t*)l->data;
  const float* sc = (const float*)l->scales;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  DISPATCH2(i8_tile256, x, w, sc, y, add, add_ld, K, N)
}

/* ---- int4 weight-only ----------------------------------------------------------------------- */

/* Block b's 16 bytes hold k0..k0+15 (low nibbles) and k0+16..k0+31 (high): widening to 32 bits
   and masking / shifting gives two float vectors that line up with x[k0..] and x[k0+16..]. */
T512I void i4_tile512(const float* x, const uint8_t* w, const float* sc, const float* off, float* y,
                      const float* add, int64_t add_ld, int64_t K, int64_t N, int64_t G,
                      int64_t n0, int64_t m0, const int R, const int MB) {
  const int64_t KG = K / G, rb = K / 2;
  __m512 acc[4][4], acc2[4][2];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int m = 0; m < 2; ++m) acc2[r][m] = _mm512_setzero_ps();
  }
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < KG; ++g) {
    __m512 s[4], o[4];
    for (int r = 0; r < R; ++r) {
      s[r] = _mm512_set1_ps(sc[(n0 + r) * KG + g]);
      o[r] = _mm512_set1_ps(off[(n0 + r) * KG + g]);
    }
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 32) {
      if ((k0 & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * rb + k0 / 2) + PF_BYTES, _MM_HINT_T0);
      __m512 xl[4], xh[4];
      for (int m = 0; m < MB; ++m) {
        xl[m] = _mm512_loadu_ps(x + (m0 + m) * K + k0);
        xh[m] = _mm512_loadu_ps(x + (m0 + m) * K + k0 + 16);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + (n0 + r) * rb + k0 / 2)));
        const __m512 wl = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(e, low)), s[r], o[r]);
        const __m512 wh = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4)), s[r], o[r]);
        for (int m = 0; m < MB; ++m) {
          acc[r][m] = _mm512_fmadd_ps(wl, xl[m], acc[r][m]);
          if (MB <= 2) acc2[r][m] = _mm512_fmadd_ps(wh, xh[m], acc2[r][m]);
          else acc[r][m] = _mm512_fmadd_ps(wh, xh[m], acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      __m512 a = MB <= 2 ? _mm512_add_ps(acc[r][m], acc2[r][m]) : acc[r][m];
      y[(m0 + m) * N + n0 + r] = ADD(m0 + m, n0 + r) + _mm512_reduce_add_ps(a);
    }
}

T512 void llmos_q_int4_avx512(const llmos_linear* l, const float* x, float* y, const float* add,
                              int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K, G = l->group;
  const uint8_t* w = (const uint8_t*)l->data;
  const float* sc = (const float*)l->scales;
  const float* off = (const float*)l->zeros;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  DISPATCH4(i4_tile512, x, w, sc, off, y, add, add_ld, K, N, G)
}

T256I void i4_tile256(const float* x, const uint8_t* w, const float* sc, const float* off, float* y,
                      const float* add, int64_t add_ld, int64_t K, int64_t N, int64_t G,
                      int64_t n0, int64_t m0, const int R, const int MB) {
  const int64_t KG = K / G, rb = K / 2;
  __m256 acc[4][2], acc2[4][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < 2; ++m) acc[r][m] = acc2[r][m] = _mm256_setzero_ps();
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t g = 0; g < KG; ++g) {
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 32) {
      if ((k0 & 127) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * rb + k0 / 2) + PF_BYTES, _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_set1_ps(sc[(n0 + r) * KG + g]), o = _mm256_set1_ps(off[(n0 + r) * KG + g]);
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + (n0 + r) * rb + k0 / 2));
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        __m256 wv[4];
        wv[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        wv[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        wv[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        wv[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int i = 0; i < 4; ++i) wv[i] = _mm256_fmsub_ps(wv[i], s, o);
        for (int m = 0; m < MB; ++m) {
          const float* xr = x + (m0 + m) * K + k0;
          acc[r][m] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xr), acc[r][m]);
          acc2[r][m] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xr + 8), acc2[r][m]);
          acc[r][m] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr + 16), acc[r][m]);
          acc2[r][m] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr + 24), acc2[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      y[(m0 + m) * N + n0 + r] = ADD(m0 + m, n0 + r) + hsum256(_mm256_add_ps(acc[r][m], acc2[r][m]));
}

T256 void llmos_q_int4_avx2(const llmos_linear* l, const float* x, float* y, const float* add,
                            int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  const int64_t N = l->N, K = l->K, G = l->group;
  const uint8_t* w = (const uint8_t*)l->data;
  const float* sc = (const float*)l->scales;
  const float* off = (const float*)l->zeros;
  int64_t n0, n1;
  share(N, t, T, &n0, &n1);
  DISPATCH2(i4_tile256, x, w, sc, off, y, add, add_ld, K, N, G)
}

/* ---- w8a8 ----------------------------------------------------------------------------------- */

/* One row of x to int8 (bias 128 added when VNNI wants it unsigned) in q[0..Kp), zero-padded
   past K so full-width loads of the last step read zeros; returns sx. */
T512I float quant_row512(const float* x, uint8_t* q, int64_t K, int64_t Kp, const int BIAS) {
  __m512 mx = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + k)));
  }
  const float amax = _mm512_reduce_max_ps(mx);
  const float sx = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m512 d = _mm512_set1_ps(sx);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), b = _mm512_set1_epi32(BIAS ? 128 : 0);
  for (k = 0; k < Kp; k += 16) {
    const __mmask16 mk = K - k >= 16 ? 0xffff : (K > k ? (__mmask16)((1u << (K - k)) - 1) : 0);
    __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + k), d));
    v = _mm512_maskz_add_epi32(mk, _mm512_min_epi32(_mm512_max_epi32(v, lo), hi), b);
    _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtepi32_epi8(v));
  }
  return sx;
}

/* VNNI: dpbusd(u8 x + 128, s8 w) sums 4 products per int32 lane; 128 * rowsum comes off at the end.
   64 weights a step; the last step's weights come through a masked load, so any K works. */
TVNNII void w8_tile_vnni512(const uint8_t* xq, int64_t Kp, const float* sx, const int8_t* w,
                            const float* sc, const int32_t* rs, float* y, const float* add,
                            int64_t add_ld, int64_t K, int64_t N, int64_t c, int64_t n0, int64_t m0,
                            const int R, const int MB) {
  __m512i acc[4][4];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    __m512i xv[4];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512(xq + (m0 + m) * Kp + k);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mk, w + (n0 + r) * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], xv[m], wv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const int32_t s = _mm512_reduce_add_epi32(acc[r][m]) - 128 * rs[n0 + r];
      y[(c + m0 + m) * N + n0 + r] = ADD(c + m0 + m, n0 + r) + (float)s * (sx[m0 + m] * sc[n0 + r]);
    }
}

/* No VNNI: maddubs(|w| unsigned, x with w's sign), then madd by ones to int32. */
T512I void w8_tile_bw512(const uint8_t* xq, int64_t Kp, const float* sx, const int8_t* w,
                         const float* sc, const int32_t* rs, float* y, const float* add,
                         int64_t add_ld, int64_t K, int64_t N, int64_t c, int64_t n0, int64_t m0,
                         const int R, const int MB) {
  (void)rs;
  __m512i acc[4][4];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    __m512i xv[4];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512(xq + (m0 + m) * Kp + k);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mk, w + (n0 + r) * K + k);
      const __m512i aw = _mm512_abs_epi8(wv);
      const __mmask64 neg = _mm512_movepi8_mask(wv);
      for (int m = 0; m < MB; ++m) {
        const __m512i xs = _mm512_mask_sub_epi8(xv[m], neg, zero, xv[m]);
        acc[r][m] = _mm512_add_epi32(acc[r][m], _mm512_madd_epi16(_mm512_maddubs_epi16(aw, xs), ones));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      const int32_t s = _mm512_reduce_add_epi32(acc[r][m]);
      y[(c + m0 + m) * N + n0 + r] = ADD(c + m0 + m, n0 + r) + (float)s * (sx[m0 + m] * sc[n0 + r]);
    }
}

#define W8A8_BODY(QROW, BIAS, TILE, DISPATCH)                                                   \
  const int64_t N = l->N, K = l->K;                                                          \
  const int8_t* w = (const int8_t*)l->data;                                                  \
  const float* sc = (const float*)l->scales;                                                 \
  const int32_t* rs = (const int32_t*)l->extra;                                              \
  int64_t n0, n1;                                                                            \
  share(N, t, T, &n0, &n1);                                                                  \
  if (n0 >= n1) return;                                                                      \
  if (K <= 0) {                                                                              \
    for (int64_t n = n0; n < n1; ++n)                                                        \
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = ADD(m, n);                              \
    return;                                                                                  \
  }                                                                                          \
  const int64_t Kp = (K + 63) / 64 * 64, MC = chunk_rows(Kp);                                \
  uint8_t xq[MC * Kp];                                                                       \
  float sx[XQ_ROWS];                                                                         \
  for (int64_t c = 0; c < M; c += MC) {                                                      \
    const int64_t Mc = M - c < MC ? M - c : MC;                                              \
    for (int64_t m = 0; m < Mc; ++m) sx[m] = QROW(x + (c + m) * K, xq + m * Kp, K, Kp, BIAS); \
    {                                                                                        \
      const int64_t M = Mc;                                                                  \
      DISPATCH(TILE, xq, Kp, sx, w, sc, rs, y, add, add_ld, K, N, c)                         \
    }                                                                                        \
  }

TVNNI void llmos_q_w8a8_vnni512(const llmos_linear* l, const float* x, float* y, const float* add,
                                int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  W8A8_BODY(quant_row512, 1, w8_tile_vnni512, DISPATCH4)
}

T512 void llmos_q_w8a8_avx512(const llmos_linear* l, const float* x, float* y, const float* add,
                              int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  W8A8_BODY(quant_row512, 0, w8_tile_bw512, DISPATCH4)
}

T256I float quant_row256(const float* x, uint8_t* q, int64_t K, int64_t Kp, const int BIAS) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float amax = _mm_cvtss_f32(m4);
  for (; k < K; ++k) {
    const float a = fabsf(x[k]);
    amax = a > amax ? a : amax;
  }
  const float sx = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m256 d = _mm256_set1_ps(sx);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), b = _mm256_set1_epi32(BIAS ? 128 : 0);
  for (k = 0; k + 8 <= K; k += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + k), d));
    v = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(v, lo), hi), b);
    /* 8 int32 in -127..255 to bytes: pack to int16 (exact), then unsigned-saturating to uint8
       (exact for 0..255; the unbiased negatives wrap below as the int8 bit pattern). */
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i bytes = BIAS ? _mm_packus_epi16(w16, w16) : _mm_packs_epi16(w16, w16);
    _mm_storel_epi64((__m128i*)(q + k), bytes);
  }
  for (; k < K; ++k) {
    float v = nearbyintf(x[k] / sx);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    q[k] = (uint8_t)(int8_t)v + (BIAS ? 128 : 0);
  }
  memset(q + K, 0, (size_t)(Kp - K));
  return sx;
}

T256I void w8_tile_avx2(const uint8_t* xq, int64_t Kp, const float* sx, const int8_t* w,
                        const float* sc, const int32_t* rs, float* y, const float* add,
                        int64_t add_ld, int64_t K, int64_t N, int64_t c, int64_t n0, int64_t m0,
                        const int R, const int MB) {
  (void)rs;
  __m256i acc[4][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    __m256i xv[2];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_si256((const __m256i*)(xq + (m0 + m) * Kp + k));
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K + k));
      const __m256i aw = _mm256_abs_epi8(wv);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], wv)), ones));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      int32_t s = hsum256i(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += (int32_t)(int8_t)xq[(m0 + m) * Kp + kk] * w[(n0 + r) * K + kk];
      y[(c + m0 + m) * N + n0 + r] = ADD(c + m0 + m, n0 + r) + (float)s * (sx[m0 + m] * sc[n0 + r]);
    }
}

TAVXVNNII void w8_tile_avxvnni(const uint8_t* xq, int64_t Kp, const float* sx, const int8_t* w,
                               const float* sc, const int32_t* rs, float* y, const float* add,
                               int64_t add_ld, int64_t K, int64_t N, int64_t c, int64_t n0, int64_t m0,
                               const int R, const int MB) {
  __m256i acc[4][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if ((k & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + (n0 + r) * K + k) + PF_BYTES, _MM_HINT_T0);
    __m256i xv[2];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_si256((const __m256i*)(xq + (m0 + m) * Kp + k));
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K + k));
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_dpbusd_avx_epi32(acc[r][m], xv[m], wv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      /* The tail takes the biased bytes too, so one 128 * rowsum comes off the whole dot. */
      int32_t s = hsum256i(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += (int32_t)xq[(m0 + m) * Kp + kk] * w[(n0 + r) * K + kk];
      s -= 128 * rs[n0 + r];
      y[(c + m0 + m) * N + n0 + r] = ADD(c + m0 + m, n0 + r) + (float)s * (sx[m0 + m] * sc[n0 + r]);
    }
}

T256 void llmos_q_w8a8_avx2(const llmos_linear* l, const float* x, float* y, const float* add,
                            int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  W8A8_BODY(quant_row256, 0, w8_tile_avx2, DISPATCH2)
}

TAVXVNNI void llmos_q_w8a8_avxvnni(const llmos_linear* l, const float* x, float* y, const float* add,
                                   int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  W8A8_BODY(quant_row256, 1, w8_tile_avxvnni, DISPATCH2)
}
#endif

/* Bits: 1 avx2, 2 fma, 4 avx512f, 8 avx512bw, 16 avx512vl, 32 avx512vnni, 64 avxvnni, 128 avx512dq
   (what the CPU and the OS support; 0 off x86). */
int llmos_q_cpu_flags(void) {
  int f = 0;
#ifdef LLMOS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) f |= 1;
  if (__builtin_cpu_supports("fma")) f |= 2;
  if (__builtin_cpu_supports("avx512f")) f |= 4;
  if (__builtin_cpu_supports("avx512bw")) f |= 8;
  if (__builtin_cpu_supports("avx512vl")) f |= 16;
  if (__builtin_cpu_supports("avx512vnni")) f |= 32;
  if (__builtin_cpu_supports("avxvnni")) f |= 64;
  if (__builtin_cpu_supports("avx512dq")) f |= 128;
#endif
  return f;
}

/* The size of llmos_linear as this library sees it (tests compare it with the ctypes mirror). */
int64_t llmos_q_sizeof_linear(void) { return (int64_t)sizeof(llmos_linear); }
