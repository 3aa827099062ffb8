// out = x + a + b on CPU: the parallel residual's two branch outputs added to the stream in one pass.
//
// The sum is formed in fp32 and rounded to T once (PyTorch's x + a + b rounds after each add).
// Elements are split across OpenMP threads; the tensors are contiguous and of one shape.
#include <omp.h>

#include "../common/cpu_common.h"

namespace neox {

template <typename T>
void add3_cpu(const T* x, const T* a, const T* b, T* out, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) out[i] = from_float<T>(to_float(x[i]) + to_float(a[i]) + to_float(b[i]));
}

#define INSTANTIATE(T) template void add3_cpu<T>(const T*, const T*, const T*, T*, int64_t);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
