// Bias + GeLU and SwiGLU on CUDA, forward and backward. Math as activations_cpu.cpp.
// v1: element-wise kernels on 16-byte packs with a grid-stride loop. bias_gelu's backward also sums
// dbias: a 2-D grid where each thread owns V columns of a column tile and walks a band of rows, keeping
// its column sums in registers; one partial row per band, summed by a second kernel.
#include "../common/cuda_common.cuh"

namespace neox {

__device__ __forceinline__ float gelu_f(float v, bool tanh_approx) {
  if (tanh_approx) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
}
__device__ __forceinline__ float gelu_grad_f(float v, bool tanh_approx) {
  if (tanh_approx) {
    const float t = tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * v * v);
  }
  return 0.5f * (1.f + erff(v * 0.7071067811865476f)) + v * 0.3989422804014327f * expf(-0.5f * v * v);
}

template <typename T, int V>
__global__ void bias_gelu_forward_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y,
                                         int64_t packs, int64_t C, bool tanh_approx) {
  float v[V];
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < packs; p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = p * V, c = e % C;  // V divides C, so a pack never crosses a row
    load<T, V>(x + e, v);
#pragma unroll
    for (int i = 0; i < V; i++) v[i] = gelu_f(v[i] + bias[c + i], tanh_approx);
    store<T, V>(y + e, v);
  }
}

template <typename T, int V>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                          const float* __restrict__ bias, T* __restrict__ dx, float* __restrict__ part,
                                          int64_t N, int64_t C, int64_t band, bool tanh_approx) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  float acc[V] = {}, g[V], v[V], b[V];
#pragma unroll
  for (int i = 0; i < V; i++) b[i] = bias[c + i];
  const int64_t r1 = min(N, (blockIdx.y + 1) * band);
  for (int64_t r = blockIdx.y * band; r < r1; r++) {
    load<T, V>(dy + r * C + c, g);
    load<T, V>(x + r * C + c, v);
#pragma unroll
    for (int i = 0; i < V; i++) {
      g[i] = to_f(from_f<T>(g[i] * gelu_grad_f(v[i] + b[i], tanh_approx)));  // dbias sums the stored dx
      acc[i] += g[i];
    }
    store<T, V>(dx + r * C + c, g);
  }
#pragma unroll
  for (int i = 0; i < V; i++) part[blockIdx.y * C + c + i] = acc[i];
}

__global__ void column_sum_kernel(const float* __restrict__ part, float* __restrict__ out, int rows, int64_t C) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0.f;
  for (int r = 0; r < rows; r++) s += part[r * C + c];
  out[c] = s;
}

// P == 1 reads the pair as two scalars: a contiguous x may start at any element, so 2-element alignment
// is not guaranteed; wider packs are used only after the launcher checked 16-byte alignment.
template <typename T, int P>
__device__ __forceinline__ void load_pairs(const T* p, float (&v)[2 * P]) {
  if constexpr (P == 1) {
    v[0] = to_f(p[0]);
    v[1] = to_f(p[1]);
  } else {
    load<T, 2 * P>(p, v);
  }
}

// P pairs per thread: 2P inputs in, P outputs out (P = 4 moves 16 bytes of bf16 in, 8 out).
template <typename T, int P>
__global__ void swiglu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t groups) {
  float v[2 * P], o[P];
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < groups; k += (int64_t)gridDim.x * blockDim.x) {
    load_pairs<T, P>(x + k * 2 * P, v);
#pragma unroll
    for (int i = 0; i < P; i++) {
      const float gate = v[2 * i], up = v[2 * i + 1];
      o[i] = gate / (1.f + expf(-gate)) * up;
    }
    store<T, P>(y + k * P, o);
  }
}

template <typename T, int P>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                       int64_t groups) {
  float v[2 * P], g[P];
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < groups; k += (int64_t)gridDim.x * blockDim.x) {
    load_pairs<T, P>(x + k * 2 * P, v);
    load<T, P>(dy + k * P, g);
#pragma unroll
    for (int i = 0; i < P; i++) {
      const float gate = v[2 * i], up = v[2 * i + 1], s = 1.f / (1.f + expf(-gate));
      v[2 * i] = g[i] * up * s * (1.f + gate * (1.f - s));
      v[2 * i + 1] = g[i] * gate * s;
    }
    if constexpr (P == 1) {
      dx[2 * k] = from_f<T>(v[0]);
      dx[2 * k + 1] = from_f<T>(v[1]);
    } else {
      store<T, 2 * P>(dx + k * 2 * P, v);
    }
  }
}

static int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads, cap = 16LL * sm_count();
  return static_cast<int>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <typename T>
void bias_gelu_forward_cuda(const T* x, const float* bias, T* y, int64_t N, int64_t C, bool tanh_approx,
                            cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, y});
  NEOX_WITH_PACK(T, vec, {
    const int64_t packs = N * C / V;
    bias_gelu_forward_kernel<T, V><<<grid_for(packs, 256), 256, 0, stream>>>(x, bias, y, packs, C, tanh_approx);
  });
}

template <typename T>
void bias_gelu_backward_cuda(const T* dy, const T* x, const float* bias, T* dx, float* dbias, float* part,
                             int64_t part_rows, int64_t N, int64_t C, bool tanh_approx, cudaStream_t stream) {
  const int vec = pack_width<T>(C, {dy, x, dx});
  const int64_t band = (N + part_rows - 1) / part_rows;
  const int bands = static_cast<int>((N + band - 1) / band);
  NEOX_WITH_PACK(T, vec, {
    const int threads = row_threads(C / V);
    dim3 grid(static_cast<unsigned>((C / V + threads - 1) / threads), bands);
    bias_gelu_backward_kernel<T, V><<<grid, threads, 0, stream>>>(dy, x, bias, dx, part, N, C, band, tanh_approx);
  });
  column_sum_kernel<<<(C + 255) / 256, 256, 0, stream>>>(part, dbias, bands, C);
}

template <typename T>
void swiglu_forward_cuda(const T* x, T* y, int64_t N, int64_t F, cudaStream_t stream) {
  constexpr int P = 8 / sizeof(T);  // 2P inputs = 16 bytes
  if (pack_width<T>(2 * N * F, {x}) > 1 && (N * F) % P == 0 && reinterpret_cast<uintptr_t>(y) % (P * sizeof(T)) == 0) {
    swiglu_forward_kernel<T, P><<<grid_for(N * F / P, 256), 256, 0, stream>>>(x, y, N * F / P);
  } else {
    swiglu_forward_kernel<T, 1><<<grid_for(N * F, 256), 256, 0, stream>>>(x, y, N * F);
  }
}

template <typename T>
void swiglu_backward_cuda(const T* dy, const T* x, T* dx, int64_t N, int64_t F, cudaStream_t stream) {
  constexpr int P = 8 / sizeof(T);
  if (pack_width<T>(2 * N * F, {x, dx}) > 1 && (N * F) % P == 0 &&
      reinterpret_cast<uintptr_t>(dy) % (P * sizeof(T)) == 0) {
    swiglu_backward_kernel<T, P><<<grid_for(N * F / P, 256), 256, 0, stream>>>(dy, x, dx, N * F / P);
  } else {
    swiglu_backward_kernel<T, 1><<<grid_for(N * F, 256), 256, 0, stream>>>(dy, x, dx, N * F);
  }
}

#define INSTANTIATE(T)                                                                                        \
  template void bias_gelu_forward_cuda<T>(const T*, const float*, T*, int64_t, int64_t, bool, cudaStream_t);   \
  template void bias_gelu_backward_cuda<T>(const T*, const T*, const float*, T*, float*, float*, int64_t,      \
                                           int64_t, int64_t, bool, cudaStream_t);                              \
  template void swiglu_forward_cuda<T>(const T*, T*, int64_t, int64_t, cudaStream_t);                         \
  template void swiglu_backward_cuda<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
