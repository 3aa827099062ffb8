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

// V consecutive fp32 values (weights, biases, partial sums) as 16-byte accesses when V % 4 == 0; the
// caller guarantees 16-byte alignment then (the launchers pass these pointers to pack_width too).
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V / 4; j++) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p) + j);
      out[4 * j] = q.x, out[4 * j + 1] = q.y, out[4 * j + 2] = q.z, out[4 * j + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; i++) out[i] = __ldg(p + i);
  }
}
template <int V>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V / 4; j++)
      reinterpret_cast<float4*>(p)[j] = make_float4(in[4 * j], in[4 * j + 1], in[4 * j + 2], in[4 * j + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; i++) p[i] = in[i];
  }
}

// K sums over the block at once (two barriers for all K); every thread gets the results.
// `scratch` holds 32 * K floats; blockDim.x % 32 == 0.
template <int K>
__device__ __forceinline__ void block_sum_k(float (&v)[K], float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < K; k++) v[k] = warp_sum(v[k]);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; k++) scratch[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; k++) v[k] = warp_sum(lane < nwarps ? scratch[k * 32 + lane] : 0.f);
}

// Column sums of a row-major fp32 matrix of per-block partials: for c < cols,
//   s = sum_{r < rows} part[r * stride + c];  c < split ? out0[c] = s : out1[c - split] = s  (out1 may be null).
// A 32 x 32 block takes 32 columns: each warp reads one 128-byte row segment per step, the 32 warps take
// every 32nd row, and the 32 per-warp sums are added in shared memory in a fixed order (deterministic).
// Launch: column_sum_v2_kernel<32, O><<<(cols + 31) / 32, dim3(32, 32)>>>; O is the output type.
template <int BY = 32, typename O = float>
__global__ void __launch_bounds__(32 * BY)
column_sum_v2_kernel(const float* __restrict__ part, int rows, int64_t stride, int64_t cols, int64_t split,
                     O* __restrict__ out0, O* __restrict__ out1) {
  __shared__ float s[BY][33];
  const int64_t c = blockIdx.x * 32LL + threadIdx.x;
  float acc = 0.f;
  if (c < cols) {
#pragma unroll 4
    for (int r = threadIdx.y; r < rows; r += BY) acc += part[r * stride + c];
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.f;
#pragma unroll
    for (int y = 0; y < BY; y++) t += s[y][threadIdx.x];
    if (c < split) out0[c] = from_f<O>(t);
    else if (out1) out1[c - split] = from_f<O>(t);
  }
}

inline int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

// Blocks of `kernel` that fit on the whole device at once (one wave of a persistent grid). The occupancy
// query runs once per (kernel, block size, device) and thread; later calls read a small memo, since these
// kernels take tens of microseconds and a driver query per launch would show.
template <typename K>
inline int resident_blocks(K kernel, int threads, size_t smem = 0) {
  struct Entry { const void* fn; int dev, threads; size_t smem; int blocks; };
  static thread_local Entry memo[64];
  static thread_local int used = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  const void* fn = reinterpret_cast<const void*>(kernel);
  for (int i = 0; i < used; i++)
    if (memo[i].fn == fn && memo[i].dev == dev && memo[i].threads == threads && memo[i].smem == smem)
      return memo[i].blocks;
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess || per_sm < 1)
    per_sm = 1;
  const int blocks = per_sm * sm_count();
  if (used < 64) memo[used++] = {fn, dev, threads, smem, blocks};
  return blocks;
}

// Let `kernel` take `bytes` of dynamic shared memory, once per kernel and device per thread. Static plus
// dynamic above 48 KB needs this opt-in, so it is made whatever the size.
template <typename K>
inline void allow_dynamic_smem(K kernel, size_t bytes) {
  struct Entry { const void* fn; int dev; size_t bytes; };
  static thread_local Entry memo[32];
  static thread_local int used = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  const void* fn = reinterpret_cast<const void*>(kernel);
  for (int i = 0; i < used; i++)
    if (memo[i].fn == fn && memo[i].dev == dev && memo[i].bytes >= bytes) return;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (used < 32) memo[used++] = {fn, dev, bytes};
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
