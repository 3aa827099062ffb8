// fp8 casts for neox.kernels.fp8 on CUDA: torchao's tensorwise dynamic scaling (hp_tensor_to_float8_dynamic) in two
// launches, bit for bit (fp8_cpu.cpp is the same math; tests/kernels/test_fp8_linear.py compares both with torchao).
//
// 1. fp8_amax: one partial max|x| per block of a persistent grid (no zeroed buffer, no atomics, no host sync).
//    |x| of bf16 is its bits with the sign cleared, and non-negative floats (inf and NaN included, NaN above inf)
//    order as their bits do: the max is taken on the bits, two halves per 32-bit word (__vmaxu2), 16-byte loads.
// 2. fp8_cast: each block reduces the partials (a few hundred floats from L2) to amax, forms the scale as torchao's
//    amax_to_scale does (fp64: (1 / max(amax, 1e-12)) * fp8_max, rounded to fp32) and writes x * scale rounded to fp8
//    (round to nearest even, saturated to +-fp8_max as torchao's clamp does; NaN stays NaN): the row-major copy
//    [R, C] and/or the transposed copy [C, R] from one read of a 64 x 64 tile, through shared memory. Block 0
//    writes scale and inv_scale = 1 / scale (IEEE division, as torch's reciprocal: the inverse is what _scaled_mm
//    takes), each its own allocation (fp8_bindings.inc says why).
//    The tile's loads are issued before the partials are reduced, so their latency overlaps; one block a tile, 8
//    blocks resident an SM (32 registers), the row bands last-first (the amax pass read the end last: L2 may hold it).
#include <cuda_fp8.h>

#include <algorithm>

#include "../common/cuda_common.cuh"

namespace neox {
namespace {

constexpr int kAmaxThreads = 1024;
constexpr int kTileRows = 64, kTile = 64;  // a cast block's tile: 64 rows x 64 columns of x
constexpr int kCastThreads = 256;
constexpr double kEps = 1e-12;  // torchao.float8.float8_utils.EPS

__global__ void __launch_bounds__(kAmaxThreads)
fp8_amax_kernel(const uint4* __restrict__ x, int64_t packs, float* __restrict__ parts) {
  __shared__ unsigned warp_max[kAmaxThreads / 32];
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  unsigned m = 0;  // two |x| bit patterns, one per 16-bit half
  for (; i + 3 * stride < packs; i += 4 * stride) {  // four 16-byte loads in flight per thread
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; u++) v[u] = __ldg(x + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; u++) {
      m = __vmaxu2(m, v[u].x & 0x7fff7fffu);
      m = __vmaxu2(m, v[u].y & 0x7fff7fffu);
      m = __vmaxu2(m, v[u].z & 0x7fff7fffu);
      m = __vmaxu2(m, v[u].w & 0x7fff7fffu);
    }
  }
  for (; i < packs; i += stride) {
    const uint4 v = __ldg(x + i);
    m = __vmaxu2(m, v.x & 0x7fff7fffu);
    m = __vmaxu2(m, v.y & 0x7fff7fffu);
    m = __vmaxu2(m, v.z & 0x7fff7fffu);
    m = __vmaxu2(m, v.w & 0x7fff7fffu);
  }
  m = __reduce_max_sync(0xffffffffu, max(m & 0xffffu, m >> 16));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = __reduce_max_sync(0xffffffffu, threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0u);
    if (threadIdx.x == 0) parts[blockIdx.x] = __uint_as_float(m << 16);  // bf16 bits -> the same fp32 value
  }
}

// Four floats to four fp8 bytes (the first in the lowest byte), round to nearest even, saturated.
template <bool E5M2>
__device__ __forceinline__ uint32_t fp8x4(float a, float b, float c, float d) {
  constexpr __nv_fp8_interpretation_t kind = E5M2 ? __NV_E5M2 : __NV_E4M3;
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, kind);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, kind);
  return lo | (hi << 16);
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

template <bool E5M2, bool PLAIN, bool TRANS>
__global__ void __launch_bounds__(kCastThreads, 8)  // a full SM: 8 blocks, 64 KB of loads in flight
fp8_cast_kernel(const uint16_t* __restrict__ x, int64_t R, int64_t C, const float* __restrict__ parts, int nparts,
                uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, float* __restrict__ scale_out,
                float* __restrict__ inv_scale_out) {
  __shared__ uint32_t tile[kTileRows][kTile / 4 + 1];  // fp8 bytes, 4 per word; the pad word spreads the banks
  __shared__ unsigned warp_max[kCastThreads / 32];
  const int t = threadIdx.x;
  // tiles in row bands, the last band first: the amax pass has just read the tensor's end, which L2 may still hold
  const int64_t col_tiles = (C + kTile - 1) / kTile, row_tiles = (R + kTileRows - 1) / kTileRows;
  const int64_t r0 = (row_tiles - 1 - blockIdx.x / col_tiles) * kTileRows, c0 = (blockIdx.x % col_tiles) * kTile;
  // load: 8 threads per row of 64 columns (16 bytes each), 32 rows per pass, all passes' loads in flight at once
  constexpr int kPasses = kTileRows / 32;
  const int lr = t / 8, lc = (t % 8) * 8;
  uint4 v[kPasses];
  bool in[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; p++) {
    const int64_t r = r0 + lr + 32 * p, c = c0 + lc;
    in[p] = r < R && c < C;  // C % 16 == 0: a pack is wholly in or out
    if (in[p]) v[p] = __ldg(reinterpret_cast<const uint4*>(x + r * C + c));
  }
  // amax from the partials (bits of non-negative floats, NaN above inf: as torch.max, NaN wins)
  unsigned m = 0;
  for (int i = t; i < nparts; i += kCastThreads) m = max(m, __float_as_uint(parts[i]));
  m = __reduce_max_sync(0xffffffffu, m);
  if (t % 32 == 0) warp_max[t / 32] = m;
  __syncthreads();
  m = warp_max[0];
#pragma unroll
  for (int w = 1; w < kCastThreads / 32; w++) m = max(m, warp_max[w]);
  double amax = __uint_as_float(m);
  amax = amax < kEps ? kEps : amax;  // torch.clamp(amax, min=EPS); NaN stays NaN
  const float fp8_max = E5M2 ? 57344.f : 448.f;
  // as torch evaluates torchao's `fp8_max / amax` (Tensor.__rtruediv__: reciprocal, then multiply); over every
  // bf16 amax it equals the one-rounding quotient, yet this is the expression torchao runs
  const float scale = static_cast<float>((1.0 / amax) * static_cast<double>(fp8_max));
  if (blockIdx.x == 0 && t == 0) {
    *scale_out = scale;
    *inv_scale_out = 1.f / scale;
  }
#pragma unroll
  for (int p = 0; p < kPasses; p++) {
    if (!in[p]) continue;
    const uint32_t w0 = fp8x4<E5M2>(bf16_lo(v[p].x) * scale, bf16_hi(v[p].x) * scale, bf16_lo(v[p].y) * scale,
                                    bf16_hi(v[p].y) * scale);
    const uint32_t w1 = fp8x4<E5M2>(bf16_lo(v[p].z) * scale, bf16_hi(v[p].z) * scale, bf16_lo(v[p].w) * scale,
                                    bf16_hi(v[p].w) * scale);
    const int64_t r = r0 + lr + 32 * p;
    if (PLAIN) *reinterpret_cast<uint2*>(out + r * C + c0 + lc) = make_uint2(w0, w1);
    if (TRANS) {
      tile[lr + 32 * p][lc / 4] = w0;
      tile[lr + 32 * p][lc / 4 + 1] = w1;
    }
  }
  if (!TRANS) return;
  __syncthreads();
  // store: each thread 4 x 4 byte blocks, transposed with byte permutes; a warp takes 8 row groups x 4 column
  // groups (its 32 shared-memory reads hit 32 banks) and writes 32 contiguous bytes in each of 4 rows of out_t
  const int lane = t % 32, warp = t / 32;
  const int cg = lane / 8 + 4 * (warp / 2);
  const int64_t c = c0 + 4 * cg;
  if (c >= C) return;  // C % 16 == 0: a 4-column group is wholly in or out
#pragma unroll
  for (int h = 0; h < kTileRows / 64; h++) {
    const int rg = lane % 8 + 8 * (warp % 2) + 16 * h;
    const int64_t r = r0 + 4 * rg;
    if (r >= R) break;  // R % 16 == 0: so are the row groups
    const uint32_t a0 = tile[4 * rg][cg], a1 = tile[4 * rg + 1][cg], a2 = tile[4 * rg + 2][cg],
                   a3 = tile[4 * rg + 3][cg];  // a_j = x[r + j][c .. c + 3]
    const uint32_t t01 = __byte_perm(a0, a1, 0x5140), t23 = __byte_perm(a2, a3, 0x5140);  // columns 0, 1
    const uint32_t u01 = __byte_perm(a0, a1, 0x7362), u23 = __byte_perm(a2, a3, 0x7362);  // columns 2, 3
    uint8_t* o = out_t + c * R + r;
    *reinterpret_cast<uint32_t*>(o) = __byte_perm(t01, t23, 0x5410);
    *reinterpret_cast<uint32_t*>(o + R) = __byte_perm(t01, t23, 0x7632);
    *reinterpret_cast<uint32_t*>(o + 2 * R) = __byte_perm(u01, u23, 0x5410);
    *reinterpret_cast<uint32_t*>(o + 3 * R) = __byte_perm(u01, u23, 0x7632);
  }
}

template <bool E5M2, bool PLAIN, bool TRANS>
void launch_cast(const uint16_t* x, int64_t R, int64_t C, const float* parts, int nparts, uint8_t* out,
                 uint8_t* out_t, float* scale, float* inv_scale, cudaStream_t stream) {
  const int64_t tiles = ((R + kTileRows - 1) / kTileRows) * ((C + kTile - 1) / kTile);
  fp8_cast_kernel<E5M2, PLAIN, TRANS><<<tiles, kCastThreads, 0, stream>>>(x, R, C, parts, nparts, out, out_t, scale,
                                                                          inv_scale);
}

}  // namespace

int fp8_amax_parts_cuda(int64_t n) {
  const int64_t packs = n / 8, per_block = kAmaxThreads;
  const int64_t wanted = std::max<int64_t>((packs + per_block - 1) / per_block, 1);
  return static_cast<int>(std::min<int64_t>(wanted, resident_blocks(fp8_amax_kernel, kAmaxThreads)));
}

void fp8_amax_cuda(const uint16_t* x, int64_t n, float* parts, int nparts, cudaStream_t stream) {
  fp8_amax_kernel<<<nparts, kAmaxThreads, 0, stream>>>(reinterpret_cast<const uint4*>(x), n / 8, parts);
}

void fp8_cast_cuda(const uint16_t* x, int64_t R, int64_t C, const float* parts, int nparts, bool e5m2, uint8_t* out,
                   uint8_t* out_t, float* scale, float* inv_scale, cudaStream_t stream) {
  const bool plain = out != nullptr, trans = out_t != nullptr;
#define NEOX_FP8_CAST(E5M2)                                                                                \
  if (plain && trans) launch_cast<E5M2, true, true>(x, R, C, parts, nparts, out, out_t, scale, inv_scale, stream); \
  else if (plain) launch_cast<E5M2, true, false>(x, R, C, parts, nparts, out, out_t, scale, inv_scale, stream);   \
  else launch_cast<E5M2, false, true>(x, R, C, parts, nparts, out, out_t, scale, inv_scale, stream);
  if (e5m2) {
    NEOX_FP8_CAST(true)
  } else {
    NEOX_FP8_CAST(false)
  }
#undef NEOX_FP8_CAST
}

}  // namespace neox
