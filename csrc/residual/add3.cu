// out = x + a + b on CUDA, the parallel residual's one-pass add. Math as add3_cpu.cpp (fp32 sum, one rounding).
// v1: a grid-stride loop over 16-byte packs (three loads in flight per thread, one store), grid capped at
//   16 blocks per SM; the n % V elements past the last whole pack go to the first threads, one each. Any
//   input that is not 16-byte aligned sends the whole tensor through the V = 1 path.
#include <algorithm>

#include "../common/cuda_common.cuh"

namespace neox {

template <typename T, int V>
__global__ void add3_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                            T* __restrict__ out, int64_t n) {
  const int64_t packs = n / V, stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  float u[V], v[V], w[V];
  for (int64_t k = tid; k < packs; k += stride) {
    load<T, V>(x + k * V, u);
    load<T, V>(a + k * V, v);
    load<T, V>(b + k * V, w);
#pragma unroll
    for (int i = 0; i < V; i++) u[i] = u[i] + v[i] + w[i];  // (x + a) + b, as the CPU kernel
    store<T, V>(out + k * V, u);
  }
  const int64_t tail = packs * V + tid;
  if (tail < n) out[tail] = from_f<T>(to_f(x[tail]) + to_f(a[tail]) + to_f(b[tail]));
}

template <typename T>
void add3_cuda(const T* x, const T* a, const T* b, T* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int vec = pack_width<T>(0, {x, a, b, out});  // row length 0: only the pointers' alignment decides
  NEOX_WITH_PACK(T, vec, {
    const int threads = 256;
    const int64_t work = n / V > 0 ? n / V : 1, cap = 16LL * sm_count();
    const int64_t blocks = std::min<int64_t>((work + threads - 1) / threads, cap);
    add3_kernel<T, V><<<blocks, threads, 0, stream>>>(x, a, b, out, n);
  });
}

#define INSTANTIATE(T) template void add3_cuda<T>(const T*, const T*, const T*, T*, int64_t, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
