// LayerNorm / RMSNorm on CUDA, forward and backward, optional fused residual add. Math as norm_cpu.cpp.
//
// v1: forward = one block per row, 16-byte packs, three sweeps over the row (sum, centred sum of
//   squares, normalise); the row is re-read from L1/L2, so DRAM sees it once. Any C.
//   backward = a persistent grid of ~4 blocks per SM walking rows; per row two sweeps (the two dot
//   products, then dx). dw/db accumulate in shared memory, each column owned by one thread (no atomics),
//   and a second kernel sums the per-block partials.
// v2: the same, but each thread keeps its (at most kCachePacks) packs of the row in registers, so the row
//   is read from memory once per pass. Used when the row fits (C <= 256 * V * kCachePacks: 8192 bf16,
//   4096 fp32 with aligned rows); v1 otherwise.
#include "../common/cuda_common.cuh"

namespace neox {

template <typename T, int V>
__global__ void norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
                                    const float* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t C, float eps,
                                    bool rms) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* src = x + row * C;
  float v[V], r[V];
  float sum = 0.f;
  if (res) {  // h = x + residual, stored in T; the statistics use the stored (rounded) values
    T* hr = h + row * C;
    for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
      load<T, V>(src + c, v);
      load<T, V>(res + row * C + c, r);
#pragma unroll
      for (int i = 0; i < V; i++) v[i] = to_f(from_f<T>(v[i] + r[i]));
      store<T, V>(hr + c, v);
#pragma unroll
      for (int i = 0; i < V; i++) sum += v[i];
    }
    src = hr;
    __syncthreads();  // h of this row written by all threads before it is re-read
  } else {
    for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
      load<T, V>(src + c, v);
#pragma unroll
      for (int i = 0; i < V; i++) sum += v[i];
    }
  }
  const float mean = rms ? 0.f : block_sum(sum, scratch) / C;
  float ss = 0.f;
  for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
    load<T, V>(src + c, v);
#pragma unroll
    for (int i = 0; i < V; i++) ss += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / C + eps);
  for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
    load<T, V>(src + c, v);
#pragma unroll
    for (int i = 0; i < V; i++) v[i] = (v[i] - mean) * rstd * w[c + i] + (b ? b[c + i] : 0.f);
    store<T, V>(y + row * C + c, v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int V>
__global__ void norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ h, const float* __restrict__ w,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     const T* __restrict__ dh, T* __restrict__ dx, float* __restrict__ part,
                                     int64_t N, int64_t C, bool rms) {
  extern __shared__ float smem[];  // [dw partial: C][db partial: C]
  __shared__ float scratch[32];
  float* sdw = smem;
  float* sdb = smem + C;
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) smem[c] = 0.f;
  __syncthreads();
  float g[V], hv[V], e[V];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* gr = dy + row * C;
    const T* hr = h + row * C;
    const float m = mean[row], s = rstd[row];
    float sum_gw = 0.f, sum_gwx = 0.f;
    for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
      load<T, V>(gr + c, g);
      load<T, V>(hr + c, hv);
#pragma unroll
      for (int i = 0; i < V; i++) {
        const float gw = g[i] * w[c + i], xh = (hv[i] - m) * s;
        sum_gw += gw;
        sum_gwx += gw * xh;
        sdw[c + i] += g[i] * xh;  // column c + i belongs to this thread in every row: no race
        sdb[c + i] += g[i];
      }
    }
    const float a = rms ? 0.f : block_sum(sum_gw, scratch) / C;
    const float bb = block_sum(sum_gwx, scratch) / C;
    for (int64_t c = threadIdx.x * V; c < C; c += blockDim.x * V) {
      load<T, V>(gr + c, g);
      load<T, V>(hr + c, hv);
      if (dh) load<T, V>(dh + row * C + c, e);
#pragma unroll
      for (int i = 0; i < V; i++) {
        const float xh = (hv[i] - m) * s;
        g[i] = s * (g[i] * w[c + i] - a - xh * bb) + (dh ? e[i] : 0.f);
      }
      store<T, V>(dx + row * C + c, g);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) part[blockIdx.x * 2 * C + c] = smem[c];
}


constexpr int kCachePacks = 4;

template <typename T, int V, int P>
__global__ void norm_forward_kernel_v2(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
                                       const float* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                                       float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t C, float eps,
                                       bool rms) {
  __shared__ float scratch[32];
  const int64_t base = blockIdx.x * C;
  float v[P][V], r[V];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
      load<T, V>(x + base + c, v[k]);
      if (res) {  // h = x + residual, stored in T; the statistics use the stored (rounded) values
        load<T, V>(res + base + c, r);
#pragma unroll
        for (int i = 0; i < V; i++) v[k][i] = to_f(from_f<T>(v[k][i] + r[i]));
        store<T, V>(h + base + c, v[k]);
      }
#pragma unroll
      for (int i = 0; i < V; i++) sum += v[k][i];
    }
  }
  const float mean = rms ? 0.f : block_sum(sum, scratch) / C;
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
#pragma unroll
      for (int i = 0; i < V; i++) ss += (v[k][i] - mean) * (v[k][i] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / C + eps);
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
#pragma unroll
      for (int i = 0; i < V; i++) v[k][i] = (v[k][i] - mean) * rstd * w[c + i] + (b ? b[c + i] : 0.f);
      store<T, V>(y + base + c, v[k]);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T, int V, int P>
__global__ void norm_backward_kernel_v2(const T* __restrict__ dy, const T* __restrict__ h,
                                        const float* __restrict__ w, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, const T* __restrict__ dh, T* __restrict__ dx,
                                        float* __restrict__ part, int64_t N, int64_t C, bool rms) {
  extern __shared__ float smem[];  // [dw partial: C][db partial: C]
  __shared__ float scratch[32];
  float* sdw = smem;
  float* sdb = smem + C;
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) smem[c] = 0.f;
  __syncthreads();
  float g[P][V], xh[P][V], e[V];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t base = row * C;
    const float m = mean[row], s = rstd[row];
    float sum_gw = 0.f, sum_gwx = 0.f;
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      if (c < C) {
        load<T, V>(dy + base + c, g[k]);
        load<T, V>(h + base + c, xh[k]);
#pragma unroll
        for (int i = 0; i < V; i++) {
          xh[k][i] = (xh[k][i] - m) * s;
          const float gw = g[k][i] * w[c + i];
          sum_gw += gw;
          sum_gwx += gw * xh[k][i];
          sdw[c + i] += g[k][i] * xh[k][i];  // column c + i belongs to this thread in every row: no race
          sdb[c + i] += g[k][i];
        }
      }
    }
    const float a = rms ? 0.f : block_sum(sum_gw, scratch) / C;
    const float bb = block_sum(sum_gwx, scratch) / C;
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      if (c < C) {
        if (dh) load<T, V>(dh + base + c, e);
#pragma unroll
        for (int i = 0; i < V; i++) g[k][i] = s * (g[k][i] * w[c + i] - a - xh[k][i] * bb) + (dh ? e[i] : 0.f);
        store<T, V>(dx + base + c, g[k]);
      }
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) part[blockIdx.x * 2 * C + c] = smem[c];
}

// dw[c] = sum_b part[b][c], db[c] = sum_b part[b][C + c]
__global__ void norm_reduce_kernel(const float* __restrict__ part, float* __restrict__ dw, float* __restrict__ db,
                                   int blocks, int64_t C) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sw = 0.f, sb = 0.f;
  for (int b = 0; b < blocks; b++) {
    sw += part[b * 2 * C + c];
    sb += part[b * 2 * C + C + c];
  }
  dw[c] = sw;
  if (db) db[c] = sb;
}

template <typename T>
void norm_forward_cuda(const T* x, const T* residual, const float* w, const float* b, T* y, T* h, float* mean,
                       float* rstd, int64_t N, int64_t C, float eps, bool rms, cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, residual, y, h});
  NEOX_WITH_PACK(T, vec, {
    const int threads = row_threads(C / V);
    if (C / V <= (int64_t)threads * kCachePacks)
      norm_forward_kernel_v2<T, V, kCachePacks><<<N, threads, 0, stream>>>(x, residual, w, b, y, h, mean, rstd, C, eps, rms);
    else
      norm_forward_kernel<T, V><<<N, threads, 0, stream>>>(x, residual, w, b, y, h, mean, rstd, C, eps, rms);
  });
}

template <typename T>
void norm_backward_cuda(const T* dy, const T* h, const float* w, const float* mean, const float* rstd, const T* dh,
                        T* dx, float* dw, float* db, float* part, int64_t part_rows, int64_t N, int64_t C, bool rms,
                        cudaStream_t stream) {
  // part: part_rows x 2C floats from the caller (torch's allocator); one block per partial row.
  const int vec = pack_width<T>(C, {dy, h, dh, dx});
  const int blocks = static_cast<int>(part_rows);
  const size_t smem = 2 * C * sizeof(float);
  NEOX_WITH_PACK(T, vec, {
    const int threads = row_threads(C / V);
    auto kernel = C / V <= (int64_t)threads * kCachePacks ? norm_backward_kernel_v2<T, V, kCachePacks>
                                                          : norm_backward_kernel<T, V>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    kernel<<<blocks, threads, smem, stream>>>(dy, h, w, mean, rstd, dh, dx, part, N, C, rms);
  });
  norm_reduce_kernel<<<(C + 255) / 256, 256, 0, stream>>>(part, dw, db, blocks, C);
}

#define INSTANTIATE(T)                                                                                      \
  template void norm_forward_cuda<T>(const T*, const T*, const float*, const float*, T*, T*, float*, float*, \
                                     int64_t, int64_t, float, bool, cudaStream_t);                           \
  template void norm_backward_cuda<T>(const T*, const T*, const float*, const float*, const float*, const T*, \
                                      T*, float*, float*, float*, int64_t, int64_t, int64_t, bool, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
