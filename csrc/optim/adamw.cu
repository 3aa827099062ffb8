// AdamW from bf16 gradients on CUDA: per element, read the bf16 gradient and the fp32 master, exp_avg and
// exp_avg_sq, write those three and the bf16 weight (28 bytes; torch's path of an fp32 gradient copy, fused
// AdamW and a copy back moves ~40).
//
// v1 (current): one launch per batch of up to kMaxTensors tensors, whose descriptors travel as the kernel's
// parameter (no host-to-device copy); each block takes one tile of kTile elements of one tensor (binary
// search over the batch's first tiles), reads the tensor's step count once and forms the bias corrections;
// 16-byte loads and stores where every pointer of the tensor is 16-byte aligned, else one element per access.
//
// The fp32 results equal torch's CUDA `_fused_adamw_` (torch 2.14, fp32 params; read from its
// aten/src/ATen/native/cuda/fused_adam_utils.cuh, FusedAdamMathFunctor + adam_math, and checked against the
// SASS of libtorch_cuda.so) bit for bit, so the operations and their rounding are spelled out with the _rn
// intrinsics rather than left to contraction:
//   - every hyperparameter is rounded to fp32 first; bias corrections in fp32 from the fp32 step count:
//     bc1 = 1 - powf(beta1, step), bc2_sqrt = sqrtf(1 - powf(beta2, step)), step_size = lr / bc1;
//   - g = grad / grad_scale (an IEEE division, only when a scale is given);
//   - weight decay (when wd != 0): p = fma(p, -(lr * wd), p);
//   - m = fma(beta1, m, fma(-beta1, g, g)); v = fma(beta2, v, fma(-beta2, g*g, g*g));
//   - p = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps), each operation rounded on its own.
// One difference: torch skips only when found_inf == 1; here any non-zero value skips.
#include <climits>

#include "../common/cuda_common.cuh"
#include "../common/ops.h"

namespace neox {
namespace {

constexpr int kThreads = 256;
constexpr int kPack = 8;      // bf16 elements per 16-byte access (two float4 of each fp32 array)
constexpr int kInFlight = 2;  // packs each thread loads before it computes
constexpr int kRounds = 2;
constexpr int64_t kTile = int64_t{kThreads} * kPack * kInFlight * kRounds;  // 8192 elements per block
constexpr int kMaxTensors = 40;  // 40 * 64 bytes of descriptors: the parameter stays under 4 KB

struct TensorArgs {
  __nv_bfloat16* w16;
  const __nv_bfloat16* g16;  // null: a zero gradient
  float *p, *m, *v;
  const float* step;
  int64_t n;
  int first_tile;  // this tensor's first block in the launch
  int aligned;     // every pointer 16-byte aligned: the packed path
};

struct Batch {
  TensorArgs t[kMaxTensors];
  int count;
};

struct Coef {
  float lr, beta1, beta2, eps, lr_wd;
  bool decay;
};

// The per-tensor constants, as torch forms them once per block: fp32 throughout.
struct Step {
  float step_size, bc2_sqrt;
};
__device__ __forceinline__ Step bias_corrections(const Coef& c, float step) {
  const float bc1 = __fsub_rn(1.f, powf(c.beta1, step));
  const float bc2 = __fsub_rn(1.f, powf(c.beta2, step));
  return {__fdiv_rn(c.lr, bc1), __fsqrt_rn(bc2)};
}

__device__ __forceinline__ void adamw_math(float& p, float& m, float& v, float g, const Coef& c, const Step& s,
                                           const float* grad_scale) {
  if (grad_scale) g = __fdiv_rn(g, *grad_scale);
  if (c.decay) p = __fmaf_rn(p, -c.lr_wd, p);
  m = __fmaf_rn(c.beta1, m, __fmaf_rn(-c.beta1, g, g));
  const float g2 = __fmul_rn(g, g);
  v = __fmaf_rn(c.beta2, v, __fmaf_rn(-c.beta2, g2, g2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), c.eps);
  p = __fsub_rn(p, __fdiv_rn(__fmul_rn(s.step_size, m), denom));
}

// 8 consecutive elements in registers: the gradient as 16 bytes (bf16 pairs), each fp32 array as two float4.
struct Pack8 {
  uint32_t g[4];
  float p[kPack], m[kPack], v[kPack];
};

__device__ __forceinline__ void load_f8(const float* src, float (&dst)[kPack]) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const float4 q = __ldcs(reinterpret_cast<const float4*>(src) + h);
    dst[4 * h] = q.x, dst[4 * h + 1] = q.y, dst[4 * h + 2] = q.z, dst[4 * h + 3] = q.w;
  }
}
__device__ __forceinline__ void store_f8(float* dst, const float (&src)[kPack]) {
#pragma unroll
  for (int h = 0; h < 2; h++)
    __stcs(reinterpret_cast<float4*>(dst) + h, make_float4(src[4 * h], src[4 * h + 1], src[4 * h + 2], src[4 * h + 3]));
}

__device__ __forceinline__ void load_pack(const TensorArgs& t, int64_t i, Pack8& r) {
  if (t.g16) {
    const uint4 q = __ldcs(reinterpret_cast<const uint4*>(t.g16 + i));
    r.g[0] = q.x, r.g[1] = q.y, r.g[2] = q.z, r.g[3] = q.w;
  } else {
    r.g[0] = r.g[1] = r.g[2] = r.g[3] = 0u;  // +0.0 in bf16
  }
  load_f8(t.p + i, r.p);
  load_f8(t.m + i, r.m);
  load_f8(t.v + i, r.v);
}

__device__ __forceinline__ void update_pack(const TensorArgs& t, int64_t i, Pack8& r, const Coef& c, const Step& s,
                                            const float* grad_scale) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < kPack; k++) {
    // bf16 -> fp32 is exact: the 16 bits become the top half of the float (little endian: low half first)
    const uint32_t bits = k % 2 ? r.g[k / 2] & 0xffff0000u : r.g[k / 2] << 16;
    adamw_math(r.p[k], r.m[k], r.v[k], __uint_as_float(bits), c, s, grad_scale);
    const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(r.p[k]));
    w[k / 2] = k % 2 ? w[k / 2] | (b << 16) : b;
  }
  store_f8(t.p + i, r.p);
  store_f8(t.m + i, r.m);
  store_f8(t.v + i, r.v);
  __stcs(reinterpret_cast<uint4*>(t.w16 + i), make_uint4(w[0], w[1], w[2], w[3]));
}

__global__ void __launch_bounds__(kThreads)
adamw_bf16_kernel(const __grid_constant__ Batch batch, const Coef c, const float* __restrict__ grad_scale,
                  const float* __restrict__ found_inf) {
  if (found_inf && *found_inf != 0.f) return;
  const int tile = blockIdx.x;
  int lo = 0, hi = batch.count - 1;  // the last tensor whose first tile is <= this block's
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (batch.t[mid].first_tile <= tile) lo = mid;
    else hi = mid - 1;
  }
  const TensorArgs& t = batch.t[lo];
  const Step s = bias_corrections(c, *t.step);
  const int64_t begin = int64_t{tile - t.first_tile} * kTile;
  const int64_t end = min(begin + kTile, t.n);

  if (t.aligned) {
    const int64_t packed_end = begin + (end - begin) / kPack * kPack;
#pragma unroll
    for (int round = 0; round < kRounds; round++) {
      Pack8 r[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; k++) {
        const int64_t i = begin + (int64_t{(round * kInFlight + k) * kThreads} + threadIdx.x) * kPack;
        if (i < packed_end) load_pack(t, i, r[k]);
      }
#pragma unroll
      for (int k = 0; k < kInFlight; k++) {
        const int64_t i = begin + (int64_t{(round * kInFlight + k) * kThreads} + threadIdx.x) * kPack;
        if (i < packed_end) update_pack(t, i, r[k], c, s, grad_scale);
      }
    }
    for (int64_t i = packed_end + threadIdx.x; i < end; i += kThreads) {  // the last tile's < 8 elements
      float p = t.p[i], m = t.m[i], v = t.v[i];
      adamw_math(p, m, v, t.g16 ? __bfloat162float(t.g16[i]) : 0.f, c, s, grad_scale);
      t.p[i] = p, t.m[i] = m, t.v[i] = v;
      t.w16[i] = __float2bfloat16_rn(p);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      float p = t.p[i], m = t.m[i], v = t.v[i];
      adamw_math(p, m, v, t.g16 ? __bfloat162float(t.g16[i]) : 0.f, c, s, grad_scale);
      t.p[i] = p, t.m[i] = m, t.v[i] = v;
      t.w16[i] = __float2bfloat16_rn(p);
    }
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void adamw_bf16_step_cuda(const AdamwSpan* spans, int64_t count, AdamwHyper h, const float* grad_scale,
                          const float* found_inf, cudaStream_t stream) {
  // torch rounds each hyperparameter to fp32 before any arithmetic (its opmath type for fp32 params).
  const float lr = static_cast<float>(h.lr), wd = static_cast<float>(h.weight_decay);
  const Coef c{lr, static_cast<float>(h.beta1), static_cast<float>(h.beta2), static_cast<float>(h.eps), lr * wd,
               wd != 0.f};
  Batch batch;
  batch.count = 0;
  int64_t tiles = 0;
  auto launch = [&] {
    if (batch.count > 0)
      adamw_bf16_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(batch, c, grad_scale, found_inf);
    batch.count = 0;
    tiles = 0;
  };
  for (int64_t i = 0; i < count; i++) {
    const AdamwSpan& s = spans[i];
    if (s.n == 0) continue;
    const int64_t n_tiles = (s.n + kTile - 1) / kTile;
    if (batch.count == kMaxTensors || tiles + n_tiles > INT_MAX) launch();
    batch.t[batch.count++] = {
        reinterpret_cast<__nv_bfloat16*>(s.w16), reinterpret_cast<const __nv_bfloat16*>(s.g16), s.master,
        s.exp_avg, s.exp_avg_sq, s.step, s.n, static_cast<int>(tiles),
        aligned16(s.w16) && aligned16(s.g16) && aligned16(s.master) && aligned16(s.exp_avg) && aligned16(s.exp_avg_sq)};
    tiles += n_tiles;
  }
  launch();
}

}  // namespace neox
