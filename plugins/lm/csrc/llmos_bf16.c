/* llmos CPU kernels.
   Linear layers: y[m, n] = add[m * add_ld + n] + sum_k x[m, k] * w[n, k], x, y, add float32 (add may
   be NULL; add_ld 0 broadcasts a bias), w bf16 bits (wt 0) or float32 (wt 1), [N, K] row-major.
   A decode step: every layer of a Llama for B single tokens in one call (llmos_decode_step). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define LLMOS_X86 1
#endif

/* Prefetch this far ahead in each weight row: the hardware prefetcher alone leaves ~15% of the
   bandwidth unused on rows as short as 1.5 KB (measured on a 2-core Xeon VM). */
#define PF_BYTES 4096

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float wscalar(const void* w, int wt, int64_t i) {
  return wt ? ((const float*)w)[i] : bf16_to_f32(((const uint16_t*)w)[i]);
}

#define ADD(m, n) (add ? add[(m) * add_ld + (n)] : 0.0f)

static void rows_scalar(const float* x, const void* w, float* y, const float* add, int64_t add_ld,
                        int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, int wt) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += wscalar(w, wt, n * K + k) * xr[k];
      y[m * N + n] = s + ADD(m, n);
    }
}

#ifdef LLMOS_X86
/* R weight rows x MB input rows; R, MB <= 4 and WT are constants after inlining, so acc lives in
   registers and the weight type costs no branch. */
__attribute__((target("avx512f"), always_inline)) static inline void tile_avx512(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t K, int64_t N,
    int64_t n0, int64_t m0, const int R, const int MB, const int WT) {
  __m512 acc[4][4];
  __m512 xv[4];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      __m512 wv;
      if (WT) {
        const float* p = (const float*)w + (n0 + r) * K + k;
        _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T0);
        wv = _mm512_loadu_ps(p);
      } else {
        const uint16_t* p = (const uint16_t*)w + (n0 + r) * K + k;
        _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T0);
        __m256i h = _mm256_loadu_si256((const __m256i*)p);
        wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += wscalar(w, WT, (n0 + r) * K + kk) * x[(m0 + m) * K + kk];
      y[(m0 + m) * N + n0 + r] = s + ADD(m0 + m, n0 + r);
    }
}

__attribute__((target("avx512f"), always_inline)) static inline void rows_avx512(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1, const int WT) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int R = n1 - n < 4 ? (int)(n1 - n) : 4;
    for (int64_t m = 0; m < M; m += 4) {
      const int MB = M - m < 4 ? (int)(M - m) : 4;
      switch (R * 8 + MB) {
#define T(r, mb) case r * 8 + mb: tile_avx512(x, w, y, add, add_ld, K, N, n, m, r, mb, WT); break;
        T(4, 4) T(4, 3) T(4, 2) T(4, 1) T(3, 4) T(3, 3) T(3, 2) T(3, 1)
        T(2, 4) T(2, 3) T(2, 2) T(2, 1) T(1, 4) T(1, 3) T(1, 2) T(1, 1)
#undef T
      }
    }
  }
}

__attribute__((target("avx512f"))) static void rows_avx512_bf16(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1) { rows_avx512(x, w, y, add, add_ld, M, K, N, n0, n1, 0); }
__attribute__((target("avx512f"))) static void rows_avx512_f32(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1) { rows_avx512(x, w, y, add, add_ld, M, K, N, n0, n1, 1); }

/* AVX2 has 16 vector registers: 4 weight rows x 2 input rows of accumulators. */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile_avx2(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t K, int64_t N,
    int64_t n0, int64_t m0, const int R, const int MB, const int WT) {
  __m256 acc[4][2];
  __m256 xv[2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      __m256 wv;
      if (WT) {
        const float* p = (const float*)w + (n0 + r) * K + k;
        if ((k & 15) == 0) _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T0);
        wv = _mm256_loadu_ps(p);
      } else {
        const uint16_t* p = (const uint16_t*)w + (n0 + r) * K + k;
        if ((k & 31) == 0) _mm_prefetch((const char*)p + PF_BYTES, _MM_HINT_T0);
        __m128i h = _mm_loadu_si128((const __m128i*)p);
        wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      q = _mm_add_ps(q, _mm_movehl_ps(q, q));
      q = _mm_add_ss(q, _mm_movehdup_ps(q));
      float s = _mm_cvtss_f32(q);
      for (int64_t kk = k; kk < K; ++kk) s += wscalar(w, WT, (n0 + r) * K + kk) * x[(m0 + m) * K + kk];
      y[(m0 + m) * N + n0 + r] = s + ADD(m0 + m, n0 + r);
    }
}

__attribute__((target("avx2,fma"), always_inline)) static inline void rows_avx2(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1, const int WT) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int R = n1 - n < 4 ? (int)(n1 - n) : 4;
    for (int64_t m = 0; m < M; m += 2) {
      const int MB = M - m < 2 ? 1 : 2;
      switch (R * 8 + MB) {
#define T(r, mb) case r * 8 + mb: tile_avx2(x, w, y, add, add_ld, K, N, n, m, r, mb, WT); break;
        T(4, 2) T(4, 1) T(3, 2) T(3, 1) T(2, 2) T(2, 1) T(1, 2) T(1, 1)
#undef T
      }
    }
  }
}

__attribute__((target("avx2,fma"))) static void rows_avx2_bf16(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1) { rows_avx2(x, w, y, add, add_ld, M, K, N, n0, n1, 0); }
__attribute__((target("avx2,fma"))) static void rows_avx2_f32(
    const float* x, const void* w, float* y, const float* add, int64_t add_ld, int64_t M, int64_t K,
    int64_t N, int64_t n0, int64_t n1) { rows_avx2(x, w, y, add, add_ld, M, K, N, n0, n1, 1); }
#endif

/* 2: AVX-512F, 1: AVX2+FMA, 0: neither (or not x86). */
int llmos_bf16_isa(void) {
#ifdef LLMOS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int llmos_bf16_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

static void rows(const float* x, const void* w, float* y, const float* add, int64_t add_ld,
                 int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, int isa, int wt) {
#ifdef LLMOS_X86
  if (isa == 2) { (wt ? rows_avx512_f32 : rows_avx512_bf16)(x, w, y, add, add_ld, M, K, N, n0, n1); return; }
  if (isa == 1) { (wt ? rows_avx2_f32 : rows_avx2_bf16)(x, w, y, add, add_ld, M, K, N, n0, n1); return; }
#endif
  rows_scalar(x, w, y, add, add_ld, M, K, N, n0, n1, wt);
}

/* Thread t of T takes a contiguous block of output rows (in blocks of 4): each streams its own
   part of w. */
#include "llmos_linear.h"

static void linear_part_dense(const float* x, const void* w, float* y, const float* add, int64_t add_ld,
                              int64_t M, int64_t K, int64_t N, int isa, int wt, int64_t t, int64_t T) {
  const int64_t blocks = (N + 3) / 4;
  const int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
  const int64_t n1 = b1 * 4 < N ? b1 * 4 : N;
  if (b0 * 4 < n1) rows(x, w, y, add, add_ld, M, K, N, b0 * 4, n1, isa, wt);
}

static void linear_part(const float* x, const void* w, float* y, const float* add, int64_t add_ld,
                        int64_t M, int64_t K, int64_t N, int isa, int wt, int64_t t, int64_t T) {
  if (wt == 2) {
    const llmos_linear* l = (const llmos_linear*)w;
    l->fn(l, x, y, add, add_ld, M, t, T);
    return;
  }
  linear_part_dense(x, w, y, add, add_ld, M, K, N, isa, wt, t, T);
}

/* The llmos_linear fn of dense weights: data float32 (flags 1) or bf16 bits (flags 0), [N, K]. */
void llmos_dense_linear_fn(const llmos_linear* l, const float* x, float* y, const float* add,
                           int64_t add_ld, int64_t M, int64_t t, int64_t T) {
  linear_part_dense(x, l->data, y, add, add_ld, M, l->K, l->N, (int)l->isa, (int)l->flags, t, T);
}

/* Any llmos_linear on its own, on `threads` threads (what a layer outside the step calls). */
void llmos_linear_call(const llmos_linear* l, const float* x, float* y, const float* add, int64_t add_ld,
                       int64_t M, int threads) {
  int64_t nt = threads < 1 ? 1 : threads;
  if (l->N * l->K < 65536) nt = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nt) if (nt > 1)
  l->fn(l, x, y, add, add_ld, M, omp_get_thread_num(), omp_get_num_threads());
#else
  l->fn(l, x, y, add, add_ld, M, 0, 1);
#endif
}

static void linear(const float* x, const void* w, float* y, const float* add, int64_t add_ld,
                   int64_t M, int64_t K, int64_t N, int isa, int wt, int threads) {
  int64_t nt = threads < 1 ? 1 : threads;
  if (nt > (N + 3) / 4) nt = (N + 3) / 4;
  if (N * K < 65536) nt = 1; /* under 128 KB of weights a fork/join costs more than it saves */
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nt) if (nt > 1)
  linear_part(x, w, y, add, add_ld, M, K, N, isa, wt, omp_get_thread_num(), omp_get_num_threads());
#else
  linear_part(x, w, y, add, add_ld, M, K, N, isa, wt, 0, 1);
#endif
}

/* x [M, K] float32, w [N, K] bf16 bits, y [M, N] float32, all contiguous. */
void llmos_bf16_linear(const float* x, const uint16_t* w, float* y, const float* add, int64_t add_ld,
                       int64_t M, int64_t K, int64_t N, int isa, int threads) {
  linear(x, w, y, add, add_ld, M, K, N, isa, 0, threads);
}

/* The same with float32 weights w [N, K]. */
void llmos_f32_linear(const float* x, const float* w, float* y, const float* add, int64_t add_ld,
                      int64_t M, int64_t K, int64_t N, int isa, int threads) {
  linear(x, w, y, add, add_ld, M, K, N, isa, 1, threads);
}

/* ---- one decode step ---------------------------------------------------------------------- */

typedef struct {
  int64_t L, B, H, nh, nkv, d, inter, V;
  int64_t k_layer, k_slot, k_head;  /* cache strides, in floats: [layer, slot, kv head, position, d] */
  const int64_t* layers;            /* per layer: norm1, qkv, o, norm2, gate_up, down (addresses) */
  const float* norm;
  const void* head;
  const float* embed;
  const int64_t* ids;               /* [B] token ids */
  const int64_t* slots;             /* [B] cache slots */
  const int64_t* pos;               /* [B] positions of the new tokens */
  const float* cos;                 /* [length, d] rotary tables */
  const float* sin;
  float* k;
  float* v;
  float *x, *h, *qkv, *att, *gu, *act, *logits;  /* buffers: [B, H], [B, H], [B, (nh+2nkv)d], [B, nh d], [B, 2 inter], [B, inter], [B, V] */
  float eps;
  int32_t isa, wt, threads;
} llmos_step;

/* RMSNorm(x) * w, as torch computes it: (x * rsqrt(mean(x^2) + eps)) * w. */
static void rms_norm(const float* x, const float* w, float* out, int64_t K, float eps) {
  double ss = 0.0;
  for (int64_t k = 0; k < K; ++k) ss += (double)x[k] * x[k];
  const float r = 1.0f / sqrtf((float)(ss / (double)K) + eps);
  for (int64_t k = 0; k < K; ++k) out[k] = (x[k] * r) * w[k];
}

/* x * cos + rotate_half(x) * sin for one head of d values. */
static void rope(const float* x, const float* c, const float* s, float* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

/* Key/value head j of row b: rotate and store its key and value at the row's position, then
   attend with its group of query heads over positions 0..pos. */
static void attend(const llmos_step* a, const float* qkv, float* att, float* kc, float* vc, int64_t j, int64_t pos) {
  const int64_t d = a->d, nh = a->nh, nkv = a->nkv, g = nh / nkv, n = pos + 1;
  const float* c = a->cos + pos * d;
  const float* s = a->sin + pos * d;
  rope(qkv + (nh + j) * d, c, s, kc + pos * d, d);
  memcpy(vc + pos * d, qkv + (nh + nkv + j) * d, (size_t)d * sizeof(float));
  const float scale = 1.0f / sqrtf((float)d);
  float q[d];
  float sc[n];
  for (int64_t qi = 0; qi < g; ++qi) {
    const int64_t hq = j * g + qi;
    rope(qkv + hq * d, c, s, q, d);
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      const float* kr = kc + t * d;
      float dot = 0.0f;
      for (int64_t i = 0; i < d; ++i) dot += q[i] * kr[i];
      sc[t] = dot * scale;
      if (sc[t] > mx) mx = sc[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      sc[t] = expf(sc[t] - mx);
      sum += sc[t];
    }
    float* o = att + hq * d;
    for (int64_t i = 0; i < d; ++i) o[i] = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const float* vr = vc + t * d;
      const float p = sc[t];
      for (int64_t i = 0; i < d; ++i) o[i] += p * vr[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

#ifdef _OPENMP
#define OMP_BARRIER _Pragma("omp barrier")
#define OMP_FOR _Pragma("omp for schedule(static)")
#else
#define OMP_BARRIER
#define OMP_FOR
#endif

static void step_body(const llmos_step* a, int64_t t, int64_t T) {
  const int64_t B = a->B, H = a->H, d = a->d, nh = a->nh, nkv = a->nkv, inter = a->inter;
  const int64_t nqkv = (nh + 2 * nkv) * d;
  OMP_FOR
  for (int64_t b = 0; b < B; ++b) memcpy(a->x + b * H, a->embed + a->ids[b] * H, (size_t)H * sizeof(float));
  for (int64_t l = 0; l < a->L; ++l) {
    const int64_t* p = a->layers + 6 * l;
    OMP_FOR
    for (int64_t b = 0; b < B; ++b) rms_norm(a->x + b * H, (const float*)p[0], a->h + b * H, H, a->eps);
    linear_part(a->h, (const void*)p[1], a->qkv, NULL, 0, B, H, nqkv, a->isa, a->wt, t, T);
    OMP_BARRIER
    OMP_FOR
    for (int64_t i = 0; i < B * nkv; ++i) {
      const int64_t b = i / nkv, j = i % nkv;
      const int64_t off = l * a->k_layer + a->slots[b] * a->k_slot + j * a->k_head;
      attend(a, a->qkv + b * nqkv, a->att + b * nh * d, a->k + off, a->v + off, j, a->pos[b]);
    }
    linear_part(a->att, (const void*)p[2], a->x, a->x, H, B, nh * d, H, a->isa, a->wt, t, T);
    OMP_BARRIER
    OMP_FOR
    for (int64_t b = 0; b < B; ++b) rms_norm(a->x + b * H, (const float*)p[3], a->h + b * H, H, a->eps);
    linear_part(a->h, (const void*)p[4], a->gu, NULL, 0, B, H, 2 * inter, a->isa, a->wt, t, T);
    OMP_BARRIER
    OMP_FOR
    for (int64_t i = 0; i < B * inter; ++i) {
      const int64_t b = i / inter, c = i % inter;
      const float gate = a->gu[b * 2 * inter + c], up = a->gu[b * 2 * inter + inter + c];
      a->act[i] = gate / (1.0f + expf(-gate)) * up;
    }
    linear_part(a->act, (const void*)p[5], a->x, a->x, H, B, inter, H, a->isa, a->wt, t, T);
    OMP_BARRIER
  }
  OMP_FOR
  for (int64_t b = 0; b < B; ++b) rms_norm(a->x + b * H, a->norm, a->h + b * H, H, a->eps);
  linear_part(a->h, a->head, a->logits, NULL, 0, B, H, a->V, a->isa, a->wt, t, T);
}

/* Every layer for B single tokens: embeds ids, writes keys and values into the cache, leaves
   logits [B, V] in a->logits. One parallel region: threads meet at barriers, not fork/joins. */
void llmos_decode_step(const llmos_step* a) {
#ifdef _OPENMP
  const int nt = a->threads < 1 ? 1 : a->threads;
#pragma omp parallel num_threads(nt) if (nt > 1)
  step_body(a, omp_get_thread_num(), omp_get_num_threads());
#else
  step_body(a, 0, 1);
#endif
}

/* The sizes of the structs Python mirrors with ctypes (tests compare them). */
int64_t llmos_sizeof_step(void) { return (int64_t)sizeof(llmos_step); }
int64_t llmos_sizeof_linear(void) { return (int64_t)sizeof(llmos_linear); }
