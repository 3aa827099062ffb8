// Scaled causal masked softmax on CUDA, forward and backward. Math as softmax_cpu.cpp.
// v1: one block per row of any length. Forward: one sweep of the visible prefix keeps a per-thread
// running (max, sum) pair, merged across the block; a second sweep writes y (zeros past the prefix).
// Only the visible prefix is read: on average half of a causal row.
// v2: the row lives in registers. A team of TPR threads (a warp for rows up to 128 packs, else 64 to
//   512 threads) takes a row, each thread P = 4 packs of 16 bytes (k * TPR + t: coalesced per k); a block
//   of >= 128 threads holds 128 / TPR rows. Forward: load the visible packs, team max, exp once per
//   element, team sum, store the whole row (zero packs past the prefix). Backward: y and dy packs of the
//   prefix kept raw, one team dot product, store. Used when rows are 16-byte aligned and SK <= 2048 packs
//   (16384 bf16/fp16, 8192 fp32; 1024-thread teams for longer rows spilled registers); v1 otherwise
//   (any length, any alignment).
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

// ---- v2 ----
// Max / sum over a team of TPR consecutive threads (TPR = 32 * 2^k); every team of the block calls these
// together. `scratch`: blockDim.x / 32 floats, one buffer per reduction kind so that a max followed by a
// sum needs no barrier between them.
template <int TPR>
__device__ __forceinline__ float team_max(float v, float* scratch) {
  v = warp_max(v);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x % 32, first = threadIdx.x / TPR * (TPR / 32);
    if (lane == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_max(lane < TPR / 32 ? scratch[first + lane] : -INFINITY);
  }
  return v;
}
template <int TPR>
__device__ __forceinline__ float team_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x % 32, first = threadIdx.x / TPR * (TPR / 32);
    if (lane == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_sum(lane < TPR / 32 ? scratch[first + lane] : 0.f);
  }
  return v;
}

// Threads per block: one team, or 128 / TPR teams of a warp each.
template <int TPR> struct V2Threads { static constexpr int value = TPR < 128 ? 128 : TPR; };

template <typename T, int V, int P, int TPR>
__global__ void __launch_bounds__(V2Threads<TPR>::value)
masked_softmax_forward_kernel_v2(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t SQ, int64_t SK,
                                 float scale) {
  constexpr int THREADS = V2Threads<TPR>::value;
  __shared__ float smax[THREADS / 32], ssum[THREADS / 32];
  const int t = threadIdx.x % TPR;
  const int64_t row = (int64_t)blockIdx.x * (THREADS / TPR) + threadIdx.x / TPR;
  const bool live = row < rows;
  const int64_t valid = live ? min(SK, row % SQ + (SK - SQ) + 1) : 0;
  float v[P][V];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
    if (j < valid) load<T, V>(x + row * SK + j, v[k]);
#pragma unroll
    for (int i = 0; i < V; i++) {
      v[k][i] = j + i < valid ? v[k][i] * scale : -INFINITY;
      m = fmaxf(m, v[k][i]);
    }
  }
  m = team_max<TPR>(m, smax);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
#pragma unroll
    for (int i = 0; i < V; i++) {
      v[k][i] = j < valid ? expf(v[k][i] - m) : 0.f;  // exp(-inf) = 0 past the prefix inside a pack
      s += v[k][i];
    }
  }
  const float inv = 1.f / team_sum<TPR>(s, ssum);
  if (!live) return;  // after the last barrier
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
    if (j < SK) {
#pragma unroll
      for (int i = 0; i < V; i++) v[k][i] *= inv;
      store<T, V>(y + row * SK + j, v[k]);
    }
  }
}

template <typename T, int V, int P, int TPR>
__global__ void __launch_bounds__(V2Threads<TPR>::value)
masked_softmax_backward_kernel_v2(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                  int64_t rows, int64_t SQ, int64_t SK, float scale) {
  constexpr int THREADS = V2Threads<TPR>::value;
  __shared__ float ssum[THREADS / 32];
  const int t = threadIdx.x % TPR;
  const int64_t row = (int64_t)blockIdx.x * (THREADS / TPR) + threadIdx.x / TPR;
  const bool live = row < rows;
  const int64_t valid = live ? min(SK, row % SQ + (SK - SQ) + 1) : 0;
  Pack<T, V> yp[P], gp[P];  // raw: half the registers of fp32 for 16-bit types
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
    if (j < valid) {
      yp[k] = *reinterpret_cast<const Pack<T, V>*>(y + row * SK + j);
      gp[k] = *reinterpret_cast<const Pack<T, V>*>(dy + row * SK + j);
    }
  }
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
    if (j < valid) {
#pragma unroll
      for (int i = 0; i < V; i++)
        if (j + i < valid) dot += to_f(gp[k].d[i]) * to_f(yp[k].d[i]);
    }
  }
  dot = team_sum<TPR>(dot, ssum);
  if (!live) return;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t j = (k * (int64_t)TPR + t) * V;
    if (j < SK) {
      float o[V];
#pragma unroll
      for (int i = 0; i < V; i++)
        o[i] = j + i < valid ? scale * to_f(yp[k].d[i]) * (to_f(gp[k].d[i]) - dot) : 0.f;
      store<T, V>(dx + row * SK + j, o);
    }
  }
}

// fwd: (a, b) = (x, unused); bwd: (a, b) = (dy, y).
template <typename T, int V, int P, int TPR>
void launch_v2(const T* a, const T* b, T* out, int64_t rows, int64_t SQ, int64_t SK, float scale, bool fwd,
               cudaStream_t stream) {
  constexpr int threads = V2Threads<TPR>::value, per_block = threads / TPR;
  const int64_t grid = (rows + per_block - 1) / per_block;
  if (fwd)
    masked_softmax_forward_kernel_v2<T, V, P, TPR><<<grid, threads, 0, stream>>>(a, out, rows, SQ, SK, scale);
  else
    masked_softmax_backward_kernel_v2<T, V, P, TPR><<<grid, threads, 0, stream>>>(a, b, out, rows, SQ, SK, scale);
}

// The v2 launch for rows of SK elements, or false when v1 must take them (unaligned, or too long).
template <typename T>
bool try_v2(const T* a, const T* b, T* out, int64_t rows, int64_t SQ, int64_t SK, float scale, bool fwd,
            cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (pack_width<T>(SK, {a, b, out}) != V) return false;
  const int64_t packs = SK / V;
  if (packs <= 32) launch_v2<T, V, 1, 32>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 64) launch_v2<T, V, 2, 32>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 128) launch_v2<T, V, 4, 32>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 256) launch_v2<T, V, 4, 64>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 512) launch_v2<T, V, 4, 128>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 1024) launch_v2<T, V, 4, 256>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else if (packs <= 2048) launch_v2<T, V, 4, 512>(a, b, out, rows, SQ, SK, scale, fwd, stream);
  else return false;
  return true;
}

template <typename T>
void masked_softmax_forward_cuda(const T* x, T* y, int64_t rows, int64_t SQ, int64_t SK, float scale,
                                 cudaStream_t stream) {
  if (try_v2<T>(x, nullptr, y, rows, SQ, SK, scale, true, stream)) return;
  masked_softmax_forward_kernel<T><<<rows, row_threads(SK, 512), 0, stream>>>(x, y, SQ, SK, scale);
}

template <typename T>
void masked_softmax_backward_cuda(const T* dy, const T* y, T* dx, int64_t rows, int64_t SQ, int64_t SK, float scale,
                                  cudaStream_t stream) {
  if (try_v2<T>(dy, y, dx, rows, SQ, SK, scale, false, stream)) return;
  masked_softmax_backward_kernel<T><<<rows, row_threads(SK, 512), 0, stream>>>(dy, y, dx, SQ, SK, scale);
}

#define INSTANTIATE(T)                                                                                          \
  template void masked_softmax_forward_cuda<T>(const T*, T*, int64_t, int64_t, int64_t, float, cudaStream_t);    \
  template void masked_softmax_backward_cuda<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, float,        \
                                                cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
