// Rotary embedding on CUDA (forward; backward = inverse rotation). Math and layouts as rotary_cpu.cpp.
// v1: one thread per output "slot" of a head: slot j < R/2 rotates pair j (both elements), slot j >= R/2
// copies one pass-through element. Consecutive threads touch consecutive elements of a head.
#include "../common/cuda_common.cuh"

namespace neox {

template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ out, int64_t total, int64_t S, int64_t H, int64_t D, int64_t R,
                              bool interleaved, float sgn) {
  const int64_t half = R / 2, slots = D - half;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t head = k / slots, j = k % slots;
    const int64_t s = (head / H) % S;
    const T* xr = x + head * D;
    T* yr = out + head * D;
    if (j < half) {
      const int64_t ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
      const float a = to_f(xr[ia]), b = to_f(xr[ib]), c = cos[s * half + j], sv = sgn * sin[s * half + j];
      yr[ia] = from_f<T>(a * c - b * sv);
      yr[ib] = from_f<T>(b * c + a * sv);
    } else {
      yr[R + j - half] = xr[R + j - half];
    }
  }
}

template <typename T>
void rotary_cuda(const T* x, const float* cos, const float* sin, T* out, int64_t B, int64_t S, int64_t H, int64_t D,
                 int64_t R, bool interleaved, bool inverse, cudaStream_t stream) {
  const int64_t total = B * S * H * (D - R / 2);
  const int64_t blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 32 * sm_count() ? blocks : 32 * sm_count());
  rotary_kernel<T><<<grid, 256, 0, stream>>>(x, cos, sin, out, total, S, H, D, R, interleaved, inverse ? -1.f : 1.f);
}

#define INSTANTIATE(T)                                                                                  \
  template void rotary_cuda<T>(const T*, const float*, const float*, T*, int64_t, int64_t, int64_t, int64_t, \
                               int64_t, bool, bool, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
