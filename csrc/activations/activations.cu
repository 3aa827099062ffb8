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
// v3 (both ops; the launchers take v3/v4 unless NEOX_ACT_VERSION says otherwise, see act_version):
//   - fewer instructions per element (bf16 erf, sm_90 SASS of the inner loops: forward 28 -> 20, backward
//     35 -> 25; at 8192 x 8192 v2's backward needed ~70 us of issue slots against 100 us of memory time at
//     copy speed, too close to overlap): the transcendental parts in the approximate PTX forms with
//     flush-to-zero (ex2.approx.ftz, rcp.approx.ftz; without .ftz, __expf and __fdividef add a compare, a
//     select and a scale each for subnormals); the erf constants folded (0.5 and 1/sqrt(2) into the
//     coefficients); bf16 pairs unpacked as 32-bit words (one instruction a value) and the backward's dx
//     rounded two at a time (F2FP.PACK_AB) before dbias sums the stored values; row pointers stepped.
//   - bias_gelu: blocks of TX column packs x TY rows (TX * TY = 256), the rows dealt round-robin over a
//     one-wave grid (row r to block row (r / TY) % bands), so the whole grid walks the tensor front to
//     back together; the forward keeps two rows' loads in flight per thread. The backward sums its TY
//     rows' dbias in shared memory: one partial row per block row (20 rows, 0.7 MB at 8192 x 8192 with
//     5 blocks per SM, where v2 wrote 264 rows, 8.6 MB), added by the same column_sum_v2 (deterministic:
//     fixed orders).
//   - SwiGLU: 16-byte loads and stores everywhere (8 bf16 outputs per pack), U = 2 packs per thread in
//     flight, a one-wave grid-stride loop; a tail of fewer than one pack of pairs is done in the same
//     launch, so a pair count that is not a multiple of 8 still takes the vector path.
// v5 = v4 with the other settings of loads in flight, to be measured against it (the bench times the
//   forward and the backward apart): bias_gelu forward 1 row a turn (v4: 2), backward 2 (v4: 1); SwiGLU
//   forward 4 packs (v4: 2), backward 1 (v4: 2). The faster of each stays; the other goes.
// v4 = v3 whose backward walks the tensor from its end: the kernel that ran just before a backward (the
//   GEMM that wrote dy in training; the forward in a bench) finished at the end, so its last tens of MB
//   can still be in the 50 MB L2. The forward walks front to back as before.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// V bias values as floats: fp32 through load_f32, a 16-bit bias (W = T) as one pack.
template <int V>
__device__ __forceinline__ void load_param(const float* p, float (&out)[V]) { load_f32<V>(p, out); }
template <int V, typename W>
__device__ __forceinline__ void load_param(const W* p, float (&out)[V]) { load<W, V>(p, out); }

template <typename T, int V, int R, bool TANH, typename W>
__global__ void __launch_bounds__(256)
bias_gelu_forward_kernel_v2(const T* __restrict__ x, const W* __restrict__ bias, T* __restrict__ y, int64_t N,
                            int64_t C) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t r_begin = N * blockIdx.y / gridDim.y, r_end = N * (blockIdx.y + 1) / gridDim.y;
  float b[V];
  load_param<V>(bias + c, b);
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
template <typename T, int V, int R, bool TANH, typename W>
__global__ void __launch_bounds__(256)
bias_gelu_backward_kernel_v2(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ bias,
                             T* __restrict__ dx, float* __restrict__ part, int64_t N, int64_t C) {
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  const int64_t r_begin = N * blockIdx.y / gridDim.y, r_end = N * (blockIdx.y + 1) / gridDim.y;
  float b[V], acc[V];
  load_param<V>(bias + c, b);
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

template <typename T, int V, bool TANH, typename W>
static void bias_gelu_forward_v2(const T* x, const W* bias, T* y, int64_t N, int64_t C, cudaStream_t stream) {
  const int threads = row_threads(C / V);
  auto kernel = bias_gelu_forward_kernel_v2<T, V, 1, TANH, W>;
  kernel<<<gelu_grid(kernel, threads, N, C, V, N), threads, 0, stream>>>(x, bias, y, N, C);
}

template <typename T, int V, bool TANH, typename W>
static void bias_gelu_backward_v2(const T* dy, const T* x, const W* bias, T* dx, W* dbias, float* part,
                                  int64_t part_rows, int64_t N, int64_t C, cudaStream_t stream) {
  const int threads = row_threads(C / V);
  auto kernel = bias_gelu_backward_kernel_v2<T, V, 1, TANH, W>;
  const dim3 grid = gelu_grid(kernel, threads, N, C, V, part_rows);
  kernel<<<grid, threads, 0, stream>>>(dy, x, bias, dx, part, N, C);
  column_sum_v2_kernel<32, W><<<(C + 31) / 32, dim3(32, 32), 0, stream>>>(part, grid.y, C, C, C, dbias, nullptr);
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

// ---- v3 / v4 ----

// NEOX_ACT_VERSION picks the kernels (bench, tests): unset, empty or 0 v4; 1 or 2 the kernels before v3
// (SwiGLU v1, bias_gelu v2); 3; 4; 5 (v4 with the other loads-in-flight settings, for a sweep). Read per call (a few hundred ns of host time against kernels of
// tens of microseconds), so one process can time all of them; neox/kernels/activations.py checks the value.
// newest: what an unset variable runs. SwiGLU keeps v1 there: on the H200 (session 20) its v4 took 0.200 ms against
// v1's 0.183 (fwd + bwd, [8192, 11264]); bias_gelu's v4 took 0.186 against v2's 0.211.
static int act_version(int newest = 4) {
  const char* s = std::getenv("NEOX_ACT_VERSION");
  const int v = (s && *s) ? std::atoi(s) : 0;
  return v == 0 ? newest : v;
}

__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / (1 + exp(-u)): ex2 of -inf-bound arguments gives +inf and rcp(inf) = 0, so the tails are exact
// (0 and 1); relative error a few ulp elsewhere.
__device__ __forceinline__ float sigmoid_fast(float u) { return rcp_ftz(1.f + ex2_ftz(u * -1.4426950408889634f)); }

// Phi(v), the standard normal CDF (gelu(v) = v * Phi(v)), and exp(-v^2 / 2), with the same
// Abramowitz & Stegun 7.1.26 form as one_plus_erf: Phi = 0.5 * (1 + erf(v / sqrt 2)), the 0.5 and the
// 1 / sqrt 2 folded into the constants. v < 0 takes the polynomial itself (no 1 - x cancellation).
__device__ __forceinline__ float normal_cdf_fast(float v, float& gauss) {
  const float t = rcp_ftz(fmaf(0.3275911f * 0.7071067811865476f, fabsf(v), 1.f));
  gauss = ex2_ftz(v * v * (-0.5f * 1.4426950408889634f));
  const float h = t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 0.5f * 1.061405429f, 0.5f * -1.453152027f), 0.5f * 1.421413741f),
                                   0.5f * -0.284496736f), 0.5f * 0.254829592f) * gauss;  // 0.5 * (1 - erf(|v| / sqrt 2))
  return v < 0.f ? h : 1.f - h;
}

// gelu(v) and gelu'(v). The tanh form is an exact rewrite: 0.5 * (1 + tanh(u)) = sigmoid(2u).
template <bool TANH>
__device__ __forceinline__ float gelu_fast(float v) {
  if constexpr (TANH) return v * sigmoid_fast(2.f * 0.7978845608028654f * fmaf(0.044715f * v, v * v, v));
  float gauss;
  return v * normal_cdf_fast(v, gauss);
}
template <bool TANH>
__device__ __forceinline__ float gelu_grad_fast(float v) {
  if constexpr (TANH) {
    const float s = sigmoid_fast(2.f * 0.7978845608028654f * fmaf(0.044715f * v, v * v, v));
    const float du = 2.f * 0.7978845608028654f * fmaf(3.f * 0.044715f * v, v, 1.f);  // d(2u)/dv
    return fmaf(v * s * (1.f - s), du, s);
  }
  float gauss;
  const float cdf = normal_cdf_fast(v, gauss);
  return fmaf(v * 0.3989422804014327f, gauss, cdf);  // Phi + v * phi
}

// A pack's values as floats. bf16 pairs are read as 32-bit words: the low value is the word shifted up 16 bits,
// the high one the word with its low 16 bits cleared (one instruction each; element-wise __bfloat162float
// takes a byte permute and a shift for every high value).
template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& p, float (&o)[V]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && V % 2 == 0) {
#pragma unroll
    for (int j = 0; j < V / 2; j++) {
      uint32_t w;
      memcpy(&w, &p.d[2 * j], 4);
      o[2 * j] = __uint_as_float(w << 16);
      o[2 * j + 1] = __uint_as_float(w & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; i++) o[i] = to_f(p.d[i]);
  }
}

// Round two values to T in one instruction where T is 16-bit (F2FP.PACK_AB; from_f per value costs an F2F
// each), and give back what was stored, as floats: the backward sums the stored dx into dbias.
template <typename T>
__device__ __forceinline__ void round_pair(float a, float b, T& ta, T& tb, float& ra, float& rb) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
    ta = p.x, tb = p.y;
    uint32_t w;
    memcpy(&w, &p, 4);
    ra = __uint_as_float(w << 16), rb = __uint_as_float(w & 0xffff0000u);
    return;
  } else if constexpr (std::is_same_v<T, __half>) {
    const __half2 p = __floats2half2_rn(a, b);
    ta = p.x, tb = p.y;
  } else {
    ta = a, tb = b;
  }
  ra = to_f(ta), rb = to_f(tb);
}

// Threads of a bias_gelu v3 block along the columns: enough for the row's packs, at most a warp.
static int gelu_tx(int64_t packs) {
  int t = 1;
  while (t < 32 && t < packs) t *= 2;
  return t;
}

// Block rows of a one-wave grid of `tiles` column tiles, at most `cap` (and one per TY rows of N).
template <typename K>
static int gelu_bands_v3(K kernel, int64_t tiles, int64_t N, int ty, int64_t cap) {
  const int64_t wave = resident_blocks(kernel, 256) / std::max<int64_t>(tiles, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wave, (N + ty - 1) / ty, cap, 65535})));
}

// Block (blockDim.x = TX column packs, blockDim.y = TY rows); row r goes to block row (r / TY) % gridDim.y,
// warp row r % TY. R rows' loads are issued before any is computed.
template <typename T, int V, int R, bool TANH, typename W>
__global__ void __launch_bounds__(256)
bias_gelu_forward_kernel_v3(const T* __restrict__ x, const W* __restrict__ bias, T* __restrict__ y, int64_t N,
                            int64_t C) {
  using PK = Pack<T, V>;
  const int64_t c = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V;
  if (c >= C) return;
  float b[V];
  load_param<V>(bias + c, b);
  const int64_t step = (int64_t)gridDim.y * blockDim.y, r_first = blockIdx.y * (int64_t)blockDim.y + threadIdx.y;
  // pointers stepped (R * step rows a turn) rather than row * C + c recomputed: fewer integer instructions
  const int64_t skip = step * C;
  const T* px = x + r_first * C + c;
  T* py = y + r_first * C + c;
  for (int64_t r0 = r_first; r0 < N; r0 += R * step, px += R * skip, py += R * skip) {
    PK in[R];
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r0 + r * step < N) in[r] = *reinterpret_cast<const PK*>(px + r * skip);
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (r0 + r * step < N) {
        float v[V];
        unpack<T, V>(in[r], v);
#pragma unroll
        for (int i = 0; i < V; i++) v[i] = gelu_fast<TANH>(v[i] + b[i]);
        store<T, V>(py + r * skip, v);
      }
    }
  }
}

// As the forward, plus dbias: each thread sums its column pack over its rows (the stored, rounded dx, as
// the reference sums), the block adds its TY rows in shared memory in a fixed order, and writes one partial
// row: part[blockIdx.y][c]. REV walks the rows from the end (v4). R rows a turn (the rows are summed in the
// same order for any R: the same dbias bits). Registers bounded for 5 blocks of 256 per SM at R = 1 (6 made
// fp16 spill), 4 at R = 2.
template <typename T, int V, int R, bool TANH, bool REV, typename W>
__global__ void __launch_bounds__(256, R == 1 ? 5 : 4)
bias_gelu_backward_kernel_v3(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ bias,
                             T* __restrict__ dx, float* __restrict__ part, int64_t N, int64_t C) {
  using PK = Pack<T, V>;
  __shared__ float red[256 * V];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c = (blockIdx.x * (int64_t)TX + tx) * V;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; i++) acc[i] = 0.f;
  if (c < C) {
    float b[V];
    load_param<V>(bias + c, b);
    const int64_t step = (int64_t)gridDim.y * TY, r_first = blockIdx.y * (int64_t)TY + ty;
    const int64_t skip = REV ? -step * C : step * C;
    int64_t off = (REV ? N - 1 - r_first : r_first) * C + c;
    for (int64_t r0 = r_first; r0 < N; r0 += R * step, off += R * skip) {
      PK gp[R], vp[R];  // R rows' loads issued before any is used
#pragma unroll
      for (int rr = 0; rr < R; rr++) {
        if (r0 + rr * step < N) {
          gp[rr] = *reinterpret_cast<const PK*>(dy + off + rr * skip);
          vp[rr] = *reinterpret_cast<const PK*>(x + off + rr * skip);
        }
      }
#pragma unroll
      for (int rr = 0; rr < R; rr++) {
        if (r0 + rr * step >= N) break;
        float g[V], v[V];  // unpacked from registers (unpack's memcpy on a global reference would load bytes)
        unpack<T, V>(gp[rr], g);
        unpack<T, V>(vp[rr], v);
#pragma unroll
        for (int i = 0; i < V; i++) g[i] *= gelu_grad_fast<TANH>(v[i] + b[i]);
        PK out;
        if constexpr (V == 1) {
          out.d[0] = from_f<T>(g[0]);
          acc[0] += to_f(out.d[0]);
        } else {
#pragma unroll
          for (int i = 0; i < V; i += 2) {
            float s0, s1;
            round_pair<T>(g[i], g[i + 1], out.d[i], out.d[i + 1], s0, s1);
            acc[i] += s0;
            acc[i + 1] += s1;
          }
        }
        *reinterpret_cast<PK*>(dx + off + rr * skip) = out;
      }
    }
  }
  // The TY partial sums of each of the tile's TW = TX * V columns (TW divides 256): P = 256 / TW threads per
  // column add TY / P rows each, then one adds the P results. Columns past C hold zeros and are not written.
  const int TW = TX * V, lid = ty * TX + tx, col = lid % TW, p = lid / TW, P = 256 / TW;
#pragma unroll
  for (int i = 0; i < V; i++) red[ty * TW + tx * V + i] = acc[i];
  __syncthreads();
  float s = 0.f;
  for (int y = p; y < TY; y += P) s += red[y * TW + col];
  __syncthreads();
  red[p * TW + col] = s;
  __syncthreads();
  const int64_t gc = blockIdx.x * (int64_t)TW + col;
  if (p == 0 && gc < C) {
    for (int q = 1; q < P; q++) s += red[q * TW + col];
    part[blockIdx.y * C + gc] = s;
  }
}

template <typename T, int V, int R, bool TANH, typename W>
static void bias_gelu_forward_v3(const T* x, const W* bias, T* y, int64_t N, int64_t C, cudaStream_t stream) {
  const int tx = gelu_tx(C / V), ty = 256 / tx;
  const int64_t tiles = (C / V + tx - 1) / tx;
  auto kernel = bias_gelu_forward_kernel_v3<T, V, R, TANH, W>;
  const int bands = gelu_bands_v3(kernel, tiles, N, ty, 65535);
  kernel<<<dim3(static_cast<unsigned>(tiles), bands), dim3(tx, ty), 0, stream>>>(x, bias, y, N, C);
}

template <typename T, int V, int R, bool TANH, bool REV, typename W>
static void bias_gelu_backward_v3(const T* dy, const T* x, const W* bias, T* dx, W* dbias, float* part,
                                  int64_t part_rows, int64_t N, int64_t C, cudaStream_t stream) {
  const int tx = gelu_tx(C / V), ty = 256 / tx;
  const int64_t tiles = (C / V + tx - 1) / tx;
  auto kernel = bias_gelu_backward_kernel_v3<T, V, R, TANH, REV, W>;
  const int bands = gelu_bands_v3(kernel, tiles, N, ty, std::max<int64_t>(part_rows, 1));
  kernel<<<dim3(static_cast<unsigned>(tiles), bands), dim3(tx, ty), 0, stream>>>(dy, x, bias, dx, part, N, C);
  column_sum_v2_kernel<32, W><<<(C + 31) / 32, dim3(32, 32), 0, stream>>>(part, bands, C, C, C, dbias, nullptr);
}

// SwiGLU v3: pack k = 8 bf16 outputs y[8k, 8k + 8) from the 16 inputs x[16k, 16k + 16) (two 16-byte loads).
// Thread t takes packs t, t + S, t + 2S, ... (S = the grid's threads), U of them loaded before any is
// computed; REV maps pack k to packs - 1 - k. The last pairs % V pairs (no whole pack) go to the first threads.
template <typename T, int U>
__global__ void __launch_bounds__(256)
swiglu_forward_kernel_v3(const T* __restrict__ x, T* __restrict__ y, int64_t packs, int64_t pairs) {
  constexpr int V = 16 / sizeof(T), H = V / 2;  // H pairs per 16-byte input pack
  using PK = Pack<T, V>;
  const int64_t S = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  for (int64_t k0 = t; k0 < packs; k0 += U * S) {
    PK in[U][2];
#pragma unroll
    for (int u = 0; u < U; u++) {
      if (k0 + u * S < packs) {
        const PK* src = reinterpret_cast<const PK*>(x) + 2 * (k0 + u * S);
        in[u][0] = src[0];
        in[u][1] = src[1];
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      if (k0 + u * S < packs) {
        float a[2][V], o[V];
        unpack<T, V>(in[u][0], a[0]);
        unpack<T, V>(in[u][1], a[1]);
#pragma unroll
        for (int i = 0; i < V; i++) {
          const float gate = a[i / H][2 * (i % H)], up = a[i / H][2 * (i % H) + 1];
          o[i] = gate * sigmoid_fast(gate) * up;
        }
        store<T, V>(y + (k0 + u * S) * V, o);
      }
    }
  }
  const int64_t j = packs * V + t;
  if (j < pairs) {
    const float gate = to_f(x[2 * j]), up = to_f(x[2 * j + 1]);
    y[j] = from_f<T>(gate * sigmoid_fast(gate) * up);
  }
}

// d gate = dy * up * s * (1 + gate * (1 - s)), d up = dy * gate * s, s = sigmoid(gate).
__device__ __forceinline__ void swiglu_grad(float g, float gate, float up, float& dgate, float& dup) {
  const float s = sigmoid_fast(gate), gs = gate * s;
  dgate = g * up * (s + fmaf(-gs, s, gs));
  dup = g * gs;
}

// At most 64 registers (4 blocks of 256 per SM; ptxas took 72 unbounded, 3 blocks).
template <typename T, int U, bool REV>
__global__ void __launch_bounds__(256, 4)
swiglu_backward_kernel_v3(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t packs,
                          int64_t pairs) {
  constexpr int V = 16 / sizeof(T), H = V / 2;
  using PK = Pack<T, V>;
  const int64_t S = (int64_t)gridDim.x * blockDim.x, t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  for (int64_t k0 = t; k0 < packs; k0 += U * S) {
    PK in[U][2], g[U];
    int64_t kk[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      kk[u] = REV ? packs - 1 - (k0 + u * S) : k0 + u * S;
      if (k0 + u * S < packs) {
        const int64_t k = kk[u];
        const PK* src = reinterpret_cast<const PK*>(x) + 2 * k;
        in[u][0] = src[0];
        in[u][1] = src[1];
        g[u] = reinterpret_cast<const PK*>(dy)[k];
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      if (k0 + u * S < packs) {
        const int64_t k = kk[u];
        float a[2][V], gg[V];
        unpack<T, V>(in[u][0], a[0]);
        unpack<T, V>(in[u][1], a[1]);
        unpack<T, V>(g[u], gg);
#pragma unroll
        for (int i = 0; i < V; i++) {  // in place: a[.][2j] becomes d gate, a[.][2j + 1] d up
          float* pr = &a[i / H][2 * (i % H)];
          swiglu_grad(gg[i], pr[0], pr[1], pr[0], pr[1]);
        }
        store<T, V>(dx + 2 * k * V, a[0]);
        store<T, V>(dx + 2 * k * V + V, a[1]);
      }
    }
  }
  const int64_t j = packs * V + t;
  if (j < pairs) {
    float dgate, dup;
    swiglu_grad(to_f(dy[j]), to_f(x[2 * j]), to_f(x[2 * j + 1]), dgate, dup);
    dx[2 * j] = from_f<T>(dgate);
    dx[2 * j + 1] = from_f<T>(dup);
  }
}

// One wave of resident blocks, fewer where the packs (or the tail) fill fewer.
template <typename K>
static int swiglu_grid_v3(K kernel, int64_t packs, int64_t tail) {
  const int64_t need = (std::max<int64_t>(packs, tail) + 255) / 256;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, resident_blocks(kernel, 256))));
}

static bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
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

// W: the bias (and dbias) type, float or T (NEOX_NATIVE_PARAMS: a 16-bit bias read as it is, no cast launches).
template <typename T, typename W>
void bias_gelu_forward_cuda(const T* x, const W* bias, T* y, int64_t N, int64_t C, bool tanh_approx,
                            cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, y, bias});
  const int version = act_version();
  NEOX_WITH_PACK(T, vec, {
    if (version <= 2) {
      if (tanh_approx) bias_gelu_forward_v2<T, V, true>(x, bias, y, N, C, stream);
      else bias_gelu_forward_v2<T, V, false>(x, bias, y, N, C, stream);
    } else if (version <= 4) {  // v3 and v4 share the forward
      if (tanh_approx) bias_gelu_forward_v3<T, V, 2, true>(x, bias, y, N, C, stream);
      else bias_gelu_forward_v3<T, V, 2, false>(x, bias, y, N, C, stream);
    } else {  // v5: one row a turn
      if (tanh_approx) bias_gelu_forward_v3<T, V, 1, true>(x, bias, y, N, C, stream);
      else bias_gelu_forward_v3<T, V, 1, false>(x, bias, y, N, C, stream);
    }
  });
}

template <typename T, typename W>
void bias_gelu_backward_cuda(const T* dy, const T* x, const W* bias, T* dx, W* dbias, float* part,
                             int64_t part_rows, int64_t N, int64_t C, bool tanh_approx, cudaStream_t stream) {
  // part: part_rows x C floats from the caller; one partial row per band (v2) or block row (v3, v4).
  const int vec = pack_width<T>(C, {dy, x, dx, bias});
  const int version = act_version();
  NEOX_WITH_PACK(T, vec, {
    if (version <= 2) {
      if (tanh_approx) bias_gelu_backward_v2<T, V, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
      else bias_gelu_backward_v2<T, V, false>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
    } else if (version == 3) {
      if (tanh_approx) bias_gelu_backward_v3<T, V, 1, true, false>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
      else bias_gelu_backward_v3<T, V, 1, false, false>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
    } else if (version == 4) {
      if (tanh_approx) bias_gelu_backward_v3<T, V, 1, true, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
      else bias_gelu_backward_v3<T, V, 1, false, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
    } else {  // v5: two rows a turn
      if (tanh_approx) bias_gelu_backward_v3<T, V, 2, true, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
      else bias_gelu_backward_v3<T, V, 2, false, true>(dy, x, bias, dx, dbias, part, part_rows, N, C, stream);
    }
  });
}

template <typename T>
void swiglu_forward_cuda(const T* x, T* y, int64_t N, int64_t F, cudaStream_t stream) {
  constexpr int P = 8 / sizeof(T);  // v1: 2P inputs = 16 bytes
  constexpr int V = 16 / sizeof(T);  // v3: V outputs = 16 bytes
  const int64_t pairs = N * F;
  const int version = act_version(1);  // unset: v1 (measured faster, above)
  if (version >= 3 && aligned16({x, y})) {  // v3 and v4 share the forward; v5 has 4 packs in flight
    auto kernel = version <= 4 ? swiglu_forward_kernel_v3<T, 2> : swiglu_forward_kernel_v3<T, 4>;
    const int64_t packs = pairs / V;
    kernel<<<swiglu_grid_v3(kernel, packs, pairs - packs * V), 256, 0, stream>>>(x, y, packs, pairs);
  } else if (pack_width<T>(2 * pairs, {x}) > 1 && pairs % P == 0 &&
             reinterpret_cast<uintptr_t>(y) % (P * sizeof(T)) == 0) {
    swiglu_forward_kernel<T, P><<<grid_for(pairs / P, 256), 256, 0, stream>>>(x, y, pairs / P);
  } else {
    swiglu_forward_kernel<T, 1><<<grid_for(pairs, 256), 256, 0, stream>>>(x, y, pairs);
  }
}

template <typename T>
void swiglu_backward_cuda(const T* dy, const T* x, T* dx, int64_t N, int64_t F, cudaStream_t stream) {
  constexpr int P = 8 / sizeof(T);
  constexpr int V = 16 / sizeof(T);
  const int64_t pairs = N * F;
  const int version = act_version(1);
  if (version >= 3 && aligned16({dy, x, dx})) {
    const int64_t packs = pairs / V, tail = pairs - packs * V;
    auto kernel = version == 3   ? swiglu_backward_kernel_v3<T, 2, false>
                  : version == 4 ? swiglu_backward_kernel_v3<T, 2, true>
                                 : swiglu_backward_kernel_v3<T, 1, true>;  // v5: one pack in flight
    kernel<<<swiglu_grid_v3(kernel, packs, tail), 256, 0, stream>>>(dy, x, dx, packs, pairs);
  } else if (pack_width<T>(2 * pairs, {x, dx}) > 1 && pairs % P == 0 &&
             reinterpret_cast<uintptr_t>(dy) % (P * sizeof(T)) == 0) {
    swiglu_backward_kernel<T, P><<<grid_for(pairs / P, 256), 256, 0, stream>>>(dy, x, dx, pairs / P);
  } else {
    swiglu_backward_kernel<T, 1><<<grid_for(pairs, 256), 256, 0, stream>>>(dy, x, dx, pairs);
  }
}

#define INSTANTIATE_GELU(T, W)                                                                                \
  template void bias_gelu_forward_cuda<T, W>(const T*, const W*, T*, int64_t, int64_t, bool, cudaStream_t);     \
  template void bias_gelu_backward_cuda<T, W>(const T*, const T*, const W*, T*, W*, float*, int64_t, int64_t,   \
                                              int64_t, bool, cudaStream_t);
#define INSTANTIATE(T)                                                                                        \
  INSTANTIATE_GELU(T, float)                                                                                  \
  template void swiglu_forward_cuda<T>(const T*, T*, int64_t, int64_t, cudaStream_t);                         \
  template void swiglu_backward_cuda<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);             \
  template void bias_grad_cuda<T>(const T*, float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)
INSTANTIATE_GELU(__nv_bfloat16, __nv_bfloat16)  // 16-bit biases as they are (W = T)
INSTANTIATE_GELU(__half, __half)

}  // namespace neox
