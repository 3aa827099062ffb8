// Bias + GeLU and SwiGLU on CUDA, forward and backward. Math as activations_cpu.cpp.
// v1: element-wise kernels on 16-byte packs with a grid-stride loop. bias_gelu's backward also sums
// dbias: a 2-D grid where each thread owns V columns of a column tile and walks a band of rows, keeping
// its column sums in registers; one partial row per band, summed by a second kernel (one thread per
// column walking every band: serial, the slow part).
// v2 (bias_gelu; SwiGLU stays v1):
//   - forward and backward both use the 2-D grid (column tiles x bands of rows), sized to one wave of
//     resident blocks; each thread walks its band R rows at a time. R = 1 measured best on an H200 at
//     8192 x 8192 bf16 (forward 82 us vs 84/90/110 for R = 2/4/8, backward 121 us vs 123/151 for R = 2/4):
//     a wave of small-register blocks keeps enough loads in flight.
//   - the bias sits in registers (no per-element modulo or bias load); erf or tanh is a template choice.
//   - erf through a branch-free approximation that shares its exponential with gelu' (one_plus_erf):
//     with erff + expf the same grid took 163 us backward and 93 us forward, against 120 and 84.
//   - dbias: one partial row per band (a few MB), added by column_sum_v2 (32 x 32 tiles, deterministic).
#include <algorithm>

#include "../common/cuda_common.cuh"

namespace neox {

// 1 + erf(z) and exp(-z^2) together, branch-free: Abramowitz & Stegun 7.1.26 (|erf error| < 1.5e-7; with
// fp32 rounding and the approximate reciprocal and exp2, < 6e-7 over the whole line, checked against
// float64). For z < 0 the sum is formed as poly * exp(-z^2) directly, so the left tail keeps its relative
// accuracy (1 + erff(z) cancels there). CUDA's erff branches on |z| (both sides run in a mixed warp) and
// gelu' needed a second, precise expf: about twice the instructions, enough to make v1 compute-bound.
__device__ __forceinline__ float one_plus_erf(float z, float& gauss) {
  const float t = __fdividef(1.f, fmaf(0.3275911f, fabsf(z), 1.f));
  gauss = __expf(-z * z);
  const float q = t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 1.061405429f, -1.453152027f), 1.421413741f), -0.284496736f),
                           0.254829592f) * gauss;  // 1 - erf(|z|)
  return z < 0.f ? q : 2.f - q;
}

template <bool TANH>
__device__ __forceinline__ float gelu_f(float v) {
  if constexpr (TANH) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  float gauss;
  return 0.5f * v * one_plus_erf(v * 0.7071067811865476f, gauss);
}
template <bool TANH>
__device__ __forceinline__ float gelu_grad_f(float v) {
  if constexpr (TANH) {
    const float t = tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * v * v);
  }
  float gauss;  // exp(-v^2 / 2): the same exponential serves erf and the Gaussian density
  const float cdf2 = one_plus_erf(v * 0.7071067811865476f, gauss);
  return 0.5f * cdf2 + v * 0.3989422804014327f * gauss;
}

template <typename T, int V, int R, bool TANH>
__global__ void __launch_bounds__(256)
bias_gelu_forward_kernel_v2(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y, int64_t N,
                            int64_t C) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t r_begin = N * blockIdx.y / gridDim.y, r_end = N * (blockIdx.y + 1) / gridDim.y;
  float b[V];
  load_f32<V>(bias + c, b);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += R) {
    float v[R][V];
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r0 + r < r_end) load<T, V>(x + (r0 + r) * C + c, v[r]);
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (r0 + r < r_end) {
#pragma unroll
        for (int i = 0; i < V; i++) v[r][i] = gelu_f<TANH>(v[r][i] + b[i]);
        store<T, V>(y + (r0 + r) * C + c, v[r]);
      }
    }
  }
}

// Band gridDim.y of rows per block row; part[blockIdx.y][c] = sum over the band of the stored dx.
template <typename T, int V, int R, bool TANH>
__global__ void __launch_bounds__(256)
bias_gelu_backward_kernel_v2(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias,
                             T* __restrict__ dx, float* __restrict__ part, int64_t N, int64_t C) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t r_begin = N * blockIdx.y / gridDim.y, r_end = N * (blockIdx.y + 1) / gridDim.y;
  float b[V], acc[V];
  load_f32<V>(bias + c, b);
#pragma unroll
  for (int i = 0; i < V; i++) acc[i] = 0.f;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += R) {
    float g[R][V], v[R][V];
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (r0 + r < r_end) {
        load<T, V>(dy + (r0 + r) * C + c, g[r]);
        load<T, V>(x + (r0 + r) * C + c, v[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (r0 + r < r_end) {
#pragma unroll
        for (int i = 0; i < V; i++) {
          g[r][i] = to_f(from_f<T>(g[r][i] * gelu_grad_f<TANH>(v[r][i] + b[i])));  // dbias sums the stored dx
          acc[i] += g[r][i];
        }
        store<T, V>(dx + (r0 + r) * C + c, g[r]);
      }
    }
  }
  store_f32<V>(part + blockIdx.y * C + c, acc);
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

// The 2-D grid of bias_gelu v2: column tiles of `threads` packs x bands of rows, one wave of resident
// blocks (fewer bands when `max_bands` says so; more column tiles than a wave takes: one band).
template <typename K>
static dim3 gelu_grid(K kernel, int threads, int64_t N, int64_t C, int V, int64_t max_bands) {
  const int64_t tiles = (C / V + threads - 1) / threads;
  const int64_t wave = resident_blocks(kernel, threads) / tiles;
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>({wave, N, max_bands, 65535}));
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(bands));
}

template <typename T, int V, bool TANH>
static void bias_gelu_forward_v2(const T* x, const float* bias, T* y, int64_t N, int64_t C, cudaStream_t stream) {
  const int threads = row_threads(C / V);
  auto kernel = bias_gelu_forward_kernel_v2<T, V, 1, TANH>;
  kernel<<<gelu_grid(kernel, threads, N, C, V, N), threads, 0, stream>>>(x, bias, y, N, C);
}

template <typename T, int V, bool TANH>
static void bias_gelu_backward_v2(const T* dy, const T* x, const float* bias, T* dx, float* dbias, float* part,
                                  int64_t part_rows, int64_t N, int64_t C, cudaStream_t stream) {
  const int threads = row_threads(C / V);
  auto kernel = bias_gelu_backward_kernel_v2<T, V, 1, TANH>;
  const dim3 grid = gelu_grid(kernel, threads, N, C, V, part_rows);
  kernel<<<grid, threads, 0, stream>>>(dy, x, bias, dx, part, N, C);
  column_sum_v2_kernel<32, float><<<(C + 31) / 32, dim3(32, 32), 0, stream>>>(part, grid.y, C, C, C, dbias, nullptr);
}

// bias_grad: the column sums of dy [N, C], a linear layer's bias gradient. torch takes it with a generic
// dim-0 reduction (on an H200, 18 ms of a 1.05 s 1.4B step for the qkv, attention-out and fc_out biases,
// about twice the time to read dy once); here bias_gelu v2's reduction without the gelu: column tiles x
// bands of rows, each thread's V column sums in registers (four rows' loads in flight), one fp32 partial
// row per band, added by column_sum_v2 (deterministic: a fixed order for a given device).
template <typename T, int V>
__global__ void __launch_bounds__(256)
bias_grad_kernel(const T* __restrict__ dy, float* __restrict__ part, int64_t N, int64_t C) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t r_begin = N * blockIdx.y / gridDim.y, r_end = N * (blockIdx.y + 1) / gridDim.y;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; i++) acc[i] = 0.f;
#pragma unroll 4
  for (int64_t r = r_begin; r < r_end; r++) {
    float g[V];
    load<T, V>(dy + r * C + c, g);
#pragma unroll
    for (int i = 0; i < V; i++) acc[i] += g[i];
  }
  store_f32<V>(part + blockIdx.y * C + c, acc);
}

template <typename T>
void bias_grad_cuda(const T* dy, float* dbias, float* part, int64_t part_rows, int64_t N, int64_t C,
                    cudaStream_t stream) {
  const int vec = pack_width<T>(C, {dy});
  NEOX_WITH_PACK(T, vec, {
    const int threads = row_threads(C / V);
    auto kernel = bias_grad_kernel<T, V>;
    const dim3 grid = gelu_grid(kernel, threads, N, C, V, part_rows);
    kernel<<<grid, threads, 0, stream>>>(dy, part, N, C);
    column_sum_v2_kernel<32, float><<<(C + 31) / 32, dim3(32, 32), 0, stream>>>(part, grid.y, C, C, C, dbias,
                                                                                  nullptr);
  });
}

template <typename T>
void bias_gelu_forward_cuda(const T* x, const float* bias, T* y, int64_t N, int64_t C, bool tanh_approx,
                            cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, y, bias});
  NEOX_WITH_PACK(T, vec, {
    if (tanh_approx) bias_gelu_forward_v2<T, V, true>(x, bias, y, N, C, stream);
    else bias_gelu_forward_v2<T, V, false>(x, bias, y, N, C, stream);
  });
}

template <typename T>
void bias_gelu_backward_cuda(const T* dy, const T* x, const float* bias, T* dx, float* dbias, float* part,
                             int64_t part_rows, int64_t N, int64_t C, bool tanh_approx, cudaStream_t stream) {
  // part: part_rows x C floats from the caller; one partial row per band.
  const int vec = pack_width<T>(C, {dy, x, dx, bias});
  NEOX_WITH_PACK(T, vec, {
    if (tanh_approx) bias_gelu_backward_v2<T, V, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
    else bias_gelu_backward_v2<T, V, false>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
  });
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
  template void swiglu_backward_cuda<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);             \
  template void bias_grad_cuda<T>(const T*, float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
