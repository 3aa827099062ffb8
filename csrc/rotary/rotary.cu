// Rotary embedding on CUDA (forward; backward = inverse rotation). Math and layouts as rotary_cpu.cpp.
// v1: one thread per output "slot" of a head: slot j < R/2 rotates pair j (both elements), slot j >= R/2
// copies one pass-through element. Consecutive threads touch consecutive elements of a head. Any shape.
// v2: the same with 16-byte packs: a slot is V consecutive pairs (NeoX layout: a pack of each half;
// interleaved: one pack holding V/2 pairs) or one pass-through pack, with cos/sin read as float4 and
// 32-bit index math. Taken when the head, the rotary part and the pointers are whole packs (any usual
// head size), else v1.
// v3 (rotary_qkv_cuda): in place on the attention's qkv buffer [B, S, G, P + 2, D] (G kv groups of P q heads,
// k, v): only the rotating packs of v2 (the first R dims of the P + 1 q/k heads of each group), so v and
// the pass-through dims are neither read nor written: for Pythia's 25% rotary a quarter of the q/k bytes of
// v2 and no output buffer. Row r (one q/k head of one token) starts at element (r + r / (P + 1)) * D: the
// r / (P + 1) v heads before it are skipped. One pointer, read and written by the same thread (no
// __restrict__ aliasing). Shapes that are not whole packs take v3's scalar form (one thread per pair).
#include "../common/cuda_common.cuh"

namespace neox {

template <typename T>
__global__ void rotary_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                              T* __restrict__ out, int64_t total, int64_t S, int64_t H, int64_t D, int64_t R,
                              bool interleaved, float sgn) {
  const int64_t half = R / 2, slots = D - half;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t head = k / slots, j = k % slots;
    const int64_t s = (head / H) % S;
    const T* xr = x + head * D;
    T* yr = out + head * D;
    if (j < half) {
      const int64_t ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
      const float a = to_f(xr[ia]), b = to_f(xr[ib]), c = cos[s * half + j], sv = sgn * sin[s * half + j];
      yr[ia] = from_f<T>(a * c - b * sv);
      yr[ib] = from_f<T>(b * c + a * sv);
    } else {
      yr[R + j - half] = xr[R + j - half];
    }
  }
}

// One thread's pack: the V rotated elements of slot p of a head row (pairs (j, j + half), or (2j, 2j + 1)
// interleaved). xr and yr may be the same row (in place: every element is read before it is written).
template <typename T, int V, bool INTERLEAVED>
__device__ __forceinline__ void rotate_pack(const T* xr, T* yr, const float* cr, const float* sr, uint32_t p,
                                            uint32_t half, float sgn) {
  if constexpr (!INTERLEAVED) {  // pairs (j, j + half) for j in [p * V, p * V + V)
    const uint32_t j = p * V;
    float a[V], b[V], c[V], sn[V];
    load<T, V>(xr + j, a);
    load<T, V>(xr + half + j, b);
    load_f32<V>(cr + j, c);
    load_f32<V>(sr + j, sn);
#pragma unroll
    for (int i = 0; i < V; i++) {
      const float sv = sgn * sn[i], ya = a[i] * c[i] - b[i] * sv, yb = b[i] * c[i] + a[i] * sv;
      a[i] = ya;
      b[i] = yb;
    }
    store<T, V>(yr + j, a);
    store<T, V>(yr + half + j, b);
  } else {  // pairs (2j, 2j + 1) for j in [p * V / 2, p * V / 2 + V / 2)
    const uint32_t e = p * V;
    float v[V], c[V / 2], sn[V / 2];
    load<T, V>(xr + e, v);
    load_f32<V / 2>(cr + e / 2, c);
    load_f32<V / 2>(sr + e / 2, sn);
#pragma unroll
    for (int i = 0; i < V / 2; i++) {
      const float a = v[2 * i], b = v[2 * i + 1], sv = sgn * sn[i];
      v[2 * i] = a * c[i] - b * sv;
      v[2 * i + 1] = b * c[i] + a * sv;
    }
    store<T, V>(yr + e, v);
  }
}

template <typename T, int V, bool INTERLEAVED>
__global__ void rotary_kernel_v2(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                 T* __restrict__ out, uint32_t total, uint32_t slots, uint32_t rot_slots, uint32_t S,
                                 uint32_t H, uint32_t D, uint32_t R, float sgn) {
  const uint32_t k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= total) return;
  const uint32_t row = k / slots, p = k - row * slots;  // row: one head of one token
  const uint32_t s = (row / H) % S, half = R / 2;
  const T* xr = x + (size_t)row * D;
  T* yr = out + (size_t)row * D;
  if (p >= rot_slots) {  // pass-through pack
    const uint32_t e = R + (p - rot_slots) * V;
    *reinterpret_cast<Pack<T, V>*>(yr + e) = *reinterpret_cast<const Pack<T, V>*>(xr + e);
    return;
  }
  rotate_pack<T, V, INTERLEAVED>(xr, yr, cos + (size_t)s * half, sin + (size_t)s * half, p, half, sgn);
}

template <typename T, int V, bool INTERLEAVED>
__global__ void rotary_qkv_kernel_v3(T* x, const float* __restrict__ cos, const float* __restrict__ sin,
                                     uint32_t total, uint32_t rot_slots, uint32_t heads, uint32_t tok_heads,
                                     uint32_t S, uint32_t D, uint32_t R, float sgn) {
  const uint32_t k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= total) return;
  const uint32_t row = k / rot_slots, p = k - row * rot_slots;  // row: one q/k head of one token
  const uint32_t s = (row / tok_heads) % S, half = R / 2;       // tok_heads = G * (P + 1) per token
  T* xr = x + (size_t)(row + row / heads) * D;                  // heads = P + 1 rotated per group
  rotate_pack<T, V, INTERLEAVED>(xr, xr, cos + (size_t)s * half, sin + (size_t)s * half, p, half, sgn);
}

// v3's scalar form: one thread per rotated pair, any shape, 64-bit indexing.
template <typename T>
__global__ void rotary_qkv_kernel_v3_scalar(T* x, const float* __restrict__ cos, const float* __restrict__ sin,
                                            int64_t total, int64_t heads, int64_t tok_heads, int64_t S, int64_t D,
                                            int64_t R, bool interleaved, float sgn) {
  const int64_t half = R / 2;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = k / half, j = k % half;
    const int64_t s = (row / tok_heads) % S;
    T* xr = x + (row + row / heads) * D;
    const int64_t ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
    const float a = to_f(xr[ia]), b = to_f(xr[ib]), c = cos[s * half + j], sv = sgn * sin[s * half + j];
    xr[ia] = from_f<T>(a * c - b * sv);
    xr[ib] = from_f<T>(b * c + a * sv);
  }
}

template <typename T>
void rotary_qkv_cuda(T* x, const float* cos, const float* sin, int64_t B, int64_t S, int64_t G, int64_t P, int64_t D,
                     int64_t R, bool interleaved, bool inverse, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rot_elems = interleaved ? R : R / 2;  // elements per head whose packs a thread starts
  const int64_t rows = B * S * G * (P + 1), slots = rot_elems / V;
  const float sgn = inverse ? -1.f : 1.f;
  if (rows == 0) return;
  const bool whole_packs = D % V == 0 && rot_elems % V == 0 && (R / 2) % 4 == 0 && pack_width<T>(D, {x}) == V &&
                           reinterpret_cast<uintptr_t>(cos) % 16 == 0 && reinterpret_cast<uintptr_t>(sin) % 16 == 0;
  if (whole_packs && rows * slots < (int64_t{1} << 31) && B * S * G * (P + 2) * D < (int64_t{1} << 40)) {
    const uint32_t total = static_cast<uint32_t>(rows * slots), blocks = (total + 255) / 256;
    auto kernel = interleaved ? rotary_qkv_kernel_v3<T, V, true> : rotary_qkv_kernel_v3<T, V, false>;
    kernel<<<blocks, 256, 0, stream>>>(x, cos, sin, total, (uint32_t)slots, (uint32_t)(P + 1), (uint32_t)(G * (P + 1)),
                                       (uint32_t)S, (uint32_t)D, (uint32_t)R, sgn);
    return;
  }
  const int64_t total = rows * (R / 2), blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 32 * sm_count() ? blocks : 32 * sm_count());
  rotary_qkv_kernel_v3_scalar<T><<<grid, 256, 0, stream>>>(x, cos, sin, total, P + 1, G * (P + 1), S, D, R,
                                                           interleaved, sgn);
}

template <typename T>
void rotary_cuda(const T* x, const float* cos, const float* sin, T* out, int64_t B, int64_t S, int64_t H, int64_t D,
                 int64_t R, bool interleaved, bool inverse, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rot_elems = interleaved ? R : R / 2;  // elements per head whose packs a rotating slot starts
  const int64_t slots = rot_elems / V + (D - R) / V, rows = B * S * H;
  // float4 reads of cos/sin need (R / 2) % 4 == 0 and 16-byte rows; with V / 2 == 2 (fp32, interleaved)
  // they are plain loads
  const bool whole_packs = D % V == 0 && (D - R) % V == 0 && rot_elems % V == 0 && (R / 2) % 4 == 0 &&
                           pack_width<T>(D, {x, out}) == V && reinterpret_cast<uintptr_t>(cos) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(sin) % 16 == 0;
  if (whole_packs && rows * slots < (int64_t{1} << 31) && rows * D < (int64_t{1} << 40)) {
    const uint32_t total = static_cast<uint32_t>(rows * slots), blocks = (total + 255) / 256;
    auto kernel = interleaved ? rotary_kernel_v2<T, V, true> : rotary_kernel_v2<T, V, false>;
    kernel<<<blocks, 256, 0, stream>>>(x, cos, sin, out, total, (uint32_t)slots, (uint32_t)(rot_elems / V),
                                       (uint32_t)S, (uint32_t)H, (uint32_t)D, (uint32_t)R, inverse ? -1.f : 1.f);
    return;
  }
  const int64_t total = B * S * H * (D - R / 2);
  const int64_t blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 32 * sm_count() ? blocks : 32 * sm_count());
  rotary_kernel<T><<<grid, 256, 0, stream>>>(x, cos, sin, out, total, S, H, D, R, interleaved, inverse ? -1.f : 1.f);
}

#define INSTANTIATE(T)                                                                                  \
  template void rotary_qkv_cuda<T>(T*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                   int64_t, bool, bool, cudaStream_t);                                 \
  template void rotary_cuda<T>(const T*, const float*, const float*, T*, int64_t, int64_t, int64_t, int64_t, \
                               int64_t, bool, bool, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
