/* llmos_linear: a linear layer in any storage, as a native kernel reads it (the ABI shared by the
   lm plugin's decode step and the kernels of other plugins, such as compress). Its ctypes mirror
   is llmos.plugins.lm.kernels.LinearDesc; tests check that the sizes agree. */
#ifndef LLMOS_LINEAR_H
#define LLMOS_LINEAR_H
#include <stdint.h>

/* A linear layer in any storage (quantized, packed), for the decode step: wt 2 in llmos_step
   means each weight address is an llmos_linear. fn computes y[m * N + n] = add[m * add_ld + n]
   (add may be NULL) + sum_k x[m * K + k] * W[n, k] for every m < M and thread t's share (of T)
   of the output rows n; the threads' shares are disjoint and cover all N rows, and fn meets no
   barrier (the step does). Plugins provide fn from their own libraries (llmos.plugins.compress). */
typedef struct llmos_linear llmos_linear;
typedef void (*llmos_linear_fn)(const llmos_linear* w, const float* x, float* y, const float* add,
                                int64_t add_ld, int64_t M, int64_t t, int64_t T);
struct llmos_linear {
  llmos_linear_fn fn;
  int64_t N, K;
  const void* data;   /* the weights, in the layout fn reads */
  const void* scales; /* whatever else fn needs: scales, zero points, sums, ... */
  const void* zeros;
  const void* extra;
  int64_t group;      /* weights per scale along K (quantized layouts), or 0 */
  int64_t isa;        /* fn's instruction set, as fn's library numbers them */
  int64_t flags;
};

#endif
