// Scaled causal masked softmax on CUDA, forward and backward. Math as softmax_cpu.cpp.
// v1: one block per row of any length. Forward: one sweep of the visible prefix keeps a per-thread
// running (max, sum) pair, merged across the block; a second sweep writes y (zeros past the prefix).
// Only the visible prefix is read: on average half of a causal row.
#include "../common/cuda_common.cuh"

namespace neox {

template <typename T>
__global__ void masked_softmax_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t SQ, int64_t SK,
                                              float scale) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t valid = min(SK, row % SQ + (SK - SQ) + 1);
  const T* xr = x + row * SK;
  T* yr = y + row * SK;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) {
    const float v = to_f(xr[j]) * scale;
    const float nm = fmaxf(m, v);
    s = s * expf(m - nm) + expf(v - nm);  // exp(-inf) = 0 handles the first element
    m = nm;
  }
  const float gm = block_max(m, scratch);
  const float gs = block_sum(m == -INFINITY ? 0.f : s * expf(m - gm), scratch);
  const float inv = 1.f / gs;
  for (int64_t j = threadIdx.x; j < SK; j += blockDim.x)
    yr[j] = from_f<T>(j < valid ? expf(to_f(xr[j]) * scale - gm) * inv : 0.f);
}

template <typename T>
__global__ void masked_softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                               int64_t SQ, int64_t SK, float scale) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t valid = min(SK, row % SQ + (SK - SQ) + 1);
  const T* gr = dy + row * SK;
  const T* yr = y + row * SK;
  T* dr = dx + row * SK;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) dot += to_f(gr[j]) * to_f(yr[j]);
  dot = block_sum(dot, scratch);
  for (int64_t j = threadIdx.x; j < SK; j += blockDim.x)
    dr[j] = from_f<T>(j < valid ? scale * to_f(yr[j]) * (to_f(gr[j]) - dot) : 0.f);
}

template <typename T>
void masked_softmax_forward_cuda(const T* x, T* y, int64_t rows, int64_t SQ, int64_t SK, float scale,
                                 cudaStream_t stream) {
  masked_softmax_forward_kernel<T><<<rows, row_threads(SK, 512), 0, stream>>>(x, y, SQ, SK, scale);
}

template <typename T>
void masked_softmax_backward_cuda(const T* dy, const T* y, T* dx, int64_t rows, int64_t SQ, int64_t SK, float scale,
                                  cudaStream_t stream) {
  masked_softmax_backward_kernel<T><<<rows, row_threads(SK, 512), 0, stream>>>(dy, y, dx, SQ, SK, scale);
}

#define INSTANTIATE(T)                                                                                          \
  template void masked_softmax_forward_cuda<T>(const T*, T*, int64_t, int64_t, int64_t, float, cudaStream_t);    \
  template void masked_softmax_backward_cuda<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, float,        \
                                                cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
