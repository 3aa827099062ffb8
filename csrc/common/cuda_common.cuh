// Shared helpers for the CUDA kernels: dtype conversion, packed 16-byte loads, warp/block reductions.
// No torch headers here: the .cu files compile against the CUDA toolkit alone, which keeps nvcc fast.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace neox {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// V consecutive elements moved as one access (16 bytes when V = 16 / sizeof(T)); V = 1 is a plain load.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T d[V]; };

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; i++) out[i] = to_f(pk.d[i]);
}
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; i++) pk.d[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Elements per 16-byte access for T, or 1 when any of the pointers/row lengths would break alignment.
template <typename T>
inline int pack_width(int64_t row_len, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (row_len % V) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16) return 1;
  return V;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats; blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

inline int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

// Threads per block for a row of `elems` packs: enough warps to cover it, at most `cap`.
inline int row_threads(int64_t elems, int cap = 256) {
  int t = 32;
  while (t < cap && t < elems) t *= 2;
  return t;
}

}  // namespace neox

// Instantiate a launcher template for the three CUDA storage types.
#define NEOX_FOR_EACH_CUDA_DTYPE(M) M(float) M(__nv_bfloat16) M(__half)
// Pick a pack width (16 bytes or 1 element) at run time and call KERNEL_CALL with the constant V.
#define NEOX_WITH_PACK(T, vec, ...)                           \
  if ((vec) == 16 / (int)sizeof(T)) {                         \
    constexpr int V = 16 / sizeof(T);                         \
    __VA_ARGS__;                                              \
  } else {                                                    \
    constexpr int V = 1;                                      \
    __VA_ARGS__;                                              \
  }
