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
// v4 (split_qkv_backward_cuda): the backward of "rotate qkv in place (v3), then split it into q, k, v" in one
// pass, in place of autograd's concatenation (torch's generic strided copy, ~2.5x slower than a copy) and v3's
// inverse rotation over its result. dq, dk, dv arrive with their own strides (SDPA's layouts; the last dim
// contiguous) and the output dqkv [B, S, G, P + 2, D] is contiguous. One block per token: the block writes the
// token's G * (P + 2) * D contiguous elements, consecutive threads consecutive 16-byte packs (coalesced
// stores); each head row is read as contiguous packs of its own tensor, and b, s (the angles' row, each
// tensor's token offset) come once per block. A thread takes v2's slots: a rotating slot (both packs of its
// pairs) rotates back with v2/v3's rotate_pack for q and k, and copies its packs for v; the other slots copy
// one pass-through pack. R = 0 (learned or ALiBi positions) is the copy alone. Taken when every pointer and
// stride is whole packs and the rotary part is as v3's; else v4's scalar form (one thread per slot of v1,
// 64-bit indexing), with the same arithmetic per pair. Since v5, v4 serves what v5 does not take (a head that is not
// 1-32 packs, a power of two) and runs when version 4 is forced (tests, bench).
// v5 (split_qkv_backward_cuda, the default where it applies): the same op aimed at copy bandwidth. What v4 lacked:
// each thread moved one or two 16-byte packs at a time (load, then store, then the next slot's load), the 14 slots of
// a Pythia row straddled warps so that a warp ran the rotate, copy and v branches one after the other, the angles
// were re-read per head, each slot paid two 32-bit divisions and four 64-bit stride products, and one block per token
// (8192 blocks of 336 threads at 1.4B) was launched and retired over and over. v5: a persistent grid of one wave of
// 256-thread blocks; a warp task is a run of whole rows of one token, L = D / V lanes per row (16 for bf16 D = 128:
// each row one coalesced 256-byte read and write); each lane issues its U = 4 loads before any store, then rotates,
// then stores; the NeoX pairs that span two packs swap them by shuffle (one lane, one pack: loads and stores do not
// branch on the slot kind), the angles are read once per task, and the divisions are multiply-high + shift with
// constants from the host. Same fp32 arithmetic as v4 (rotated_a/rotated_b), so bitwise v4's values. Taken where v4's
// packs apply and L is a power of two up to 32 (bf16/fp16 heads of 8-256, fp32 of 4-128).
// v6 (rotary_qkv_cuda, forced with version 6 only: measured 0.95x v3 on the H200, session 20): v3's op laid out per token, as Liger's rope (one program per
// token, all its heads) but on warps. What v3 lacked: a thread rotated one pack and re-read the pack's angles
// (V cos + V sin floats: 64 bytes for bf16, twice the 32 bytes of q/k it moved), paid three run-time 32-bit divisions,
// and had one load in flight. v6: a warp task is RW * U q/k rows of one token; a row's rotated part is L lanes (v3's
// slots: NeoX L = R / (2V), a lane owns V pairs (j, j + R/2) as one pack of each half; interleaved L = R / V, a lane
// owns one pack of V/2 pairs), so RW = 32 / L rows per warp instruction (Pythia's 25% bf16: L = 2, 16 heads' 64 bytes
// per instruction; full: L = 8). Each lane reads its angles once per task, issues its 4 16-byte loads (U = 2 rows NeoX,
// 4 interleaved) before any store, then rotates and stores; rows are r + r / (P + 1) (v skipped) by multiply-high
// division. A persistent grid of one wave of 256-thread blocks strides over the tasks (no tail of half-full waves).
// Same rotate arithmetic as v3 (rotated_a/rotated_b), so bitwise v3's values. Taken where v3's packs apply and
// L <= 32 (rotary parts up to 512 NeoX / 256 interleaved in bf16/fp16, 256 / 128 in fp32); version 3 forces v3.
// v7 (forced with version 7 only, to be measured beside v6): v6 with the loads asynchronous (cp.async into each warp's
// shared memory, S - 1 = 3 tasks ahead), so the bytes in flight are not bounded by the registers that hold them.
#include <cuda_pipeline.h>

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

// The two halves of one rotated pair (a, b) by angle (c, s), sgn = -1 for the inverse: a c - b (sgn s) and
// b c + a (sgn s), spelled out with _rn intrinsics in the order nvcc contracted the plain expressions to (sgn s,
// the product, then one fma), so that every kernel that rotates a pack rounds alike (v5 bitwise v4).
__device__ __forceinline__ float rotated_a(float a, float b, float c, float s, float sgn) {
  return __fmaf_rn(a, c, -__fmul_rn(b, __fmul_rn(s, sgn)));
}
__device__ __forceinline__ float rotated_b(float a, float b, float c, float s, float sgn) {
  return __fmaf_rn(b, c, __fmul_rn(a, __fmul_rn(s, sgn)));
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
      const float ya = rotated_a(a[i], b[i], c[i], sn[i], sgn), yb = rotated_b(a[i], b[i], c[i], sn[i], sgn);
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
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = rotated_a(a, b, c[i], sn[i], sgn);
      v[2 * i + 1] = rotated_b(a, b, c[i], sn[i], sgn);
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

// Where v4 reads head h (< P: q head h; P: k; P + 1: v) of group g of token (b, s).
struct QKVGrads {
  int64_t q[4], k[3], v[3];  // element strides over (b, s, g[, h]), as ops.h's strides
};

template <typename T>
__device__ __forceinline__ const T* qkv_grad_row(const T* dq, const T* dk, const T* dv, const QKVGrads& st, int64_t b,
                                                 int64_t s, int64_t g, int64_t h, int64_t P) {
  if (h < P) return dq + b * st.q[0] + s * st.q[1] + g * st.q[2] + h * st.q[3];
  if (h == P) return dk + b * st.k[0] + s * st.k[1] + g * st.k[2];
  return dv + b * st.v[0] + s * st.v[1] + g * st.v[2];
}

template <typename T, int V, bool INTERLEAVED>
__global__ void __launch_bounds__(512)
split_qkv_backward_v4(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv, QKVGrads st,
                      T* __restrict__ out, const float* __restrict__ cos, const float* __restrict__ sin, uint32_t S,
                      uint32_t heads, uint32_t P, uint32_t D, uint32_t R, uint32_t slots, uint32_t rot_slots,
                      float sgn) {
  using Pk = Pack<T, V>;
  const uint32_t token = blockIdx.x, b = token / S, s = token - b * S, half = R / 2, token_slots = heads * slots;
  T* out_token = out + (size_t)token * heads * D;  // heads = G * (P + 2) rows of D per token
  const float* cr = cos + (size_t)s * half;  // unused (never read) when R = 0
  const float* sr = sin + (size_t)s * half;
  for (uint32_t t = threadIdx.x; t < token_slots; t += blockDim.x) {
    const uint32_t row = t / slots, p = t - row * slots;  // row: head h of group g of this token
    const uint32_t g = row / (P + 2), h = row - g * (P + 2);
    const T* src = qkv_grad_row(dq, dk, dv, st, b, s, g, h, P);
    T* dst = out_token + (size_t)row * D;
    if (p >= rot_slots) {  // pass-through pack
      const uint32_t e = R + (p - rot_slots) * V;
      *reinterpret_cast<Pk*>(dst + e) = *reinterpret_cast<const Pk*>(src + e);
    } else if (h <= P) {  // q or k: rotate back
      rotate_pack<T, V, INTERLEAVED>(src, dst, cr, sr, p, half, sgn);  // sgn = -1, a parameter as in v3
    } else if (INTERLEAVED) {  // v: the slot's packs as they are
      *reinterpret_cast<Pk*>(dst + p * V) = *reinterpret_cast<const Pk*>(src + p * V);
    } else {
      *reinterpret_cast<Pk*>(dst + p * V) = *reinterpret_cast<const Pk*>(src + p * V);
      *reinterpret_cast<Pk*>(dst + half + p * V) = *reinterpret_cast<const Pk*>(src + half + p * V);
    }
  }
}

// v4's scalar form: one thread per slot of a head (v1's: slot j < R/2 pair j, else one pass-through element).
template <typename T>
__global__ void split_qkv_backward_v4_scalar(const T* dq, const T* dk, const T* dv, QKVGrads st, T* __restrict__ out,
                                             const float* __restrict__ cos, const float* __restrict__ sin,
                                             int64_t total, int64_t S, int64_t G, int64_t P, int64_t D, int64_t R,
                                             bool interleaved, float sgn) {
  const int64_t half = R / 2, slots = D - half;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = k / slots, j = k % slots;  // row: one head of dqkv, in its order
    const int64_t h = row % (P + 2), g = (row / (P + 2)) % G, token = row / ((P + 2) * G);
    const int64_t b = token / S, s = token % S;
    const T* src = qkv_grad_row(dq, dk, dv, st, b, s, g, h, P);
    T* dst = out + row * D;
    if (j >= half) {
      dst[R + j - half] = src[R + j - half];
      continue;
    }
    const int64_t ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
    if (h > P) {  // v
      dst[ia] = src[ia];
      dst[ib] = src[ib];
      continue;
    }
    const float a = to_f(src[ia]), bv = to_f(src[ib]), c = cos[s * half + j], sv = sgn * sin[s * half + j];
    dst[ia] = from_f<T>(a * c - bv * sv);
    dst[ib] = from_f<T>(bv * c + a * sv);
  }
}

// n / d for n < 2^31 by a multiply-high and a shift (d fixed per launch, 1 <= d < 2^31): m and s from the host.
struct FastDiv {
  uint32_t d, m, s;
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

inline FastDiv fast_div(uint32_t d) {  // s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1
  uint32_t s = 0;
  while ((uint64_t{1} << s) < d) s++;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1;
  return {d, static_cast<uint32_t>(m), s};
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[V]) {
  Pack<T, V> p;
  memcpy(&p, &u, sizeof(u));
#pragma unroll
  for (int i = 0; i < V; i++) f[i] = to_f(p.d[i]);
}
template <typename T, int V>
__device__ __forceinline__ uint4 repack(const float (&f)[V]) {
  Pack<T, V> p;
#pragma unroll
  for (int i = 0; i < V; i++) p.d[i] = from_f<T>(f[i]);
  uint4 u;
  memcpy(&u, &p, sizeof(u));
  return u;
}

// v5: a warp task is C = (32 / L) * U rows of one token (L = D / V lanes per row): task w takes rows [c C, c C + C)
// of token w / chunks, c = w % chunks (rows past the token's heads idle).
// Lane (sub, pk) = (lane / L, lane % L) takes pack pk of rows c * C + i * (32 / L) + sub, i < U: all U loads
// first, then the rotation, then the U stores; each row is L lanes reading and writing its 256 (bf16 D = 128)
// contiguous bytes. The lane's angles are loaded once per task. NeoX pairs span two packs: lane pk < d2 holds the
// first elements of its pairs, lane pk + d2 the second, and they swap packs by shuffle. R = 0 (ROT false): copy.
template <typename T, int V, int U, bool ROT, bool INTERLEAVED>
__global__ void __launch_bounds__(256)
split_qkv_backward_v5(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv, QKVGrads st,
                      T* __restrict__ out, const float* __restrict__ cos, const float* __restrict__ sin,
                      uint32_t tasks, FastDiv chunks, FastDiv seq, FastDiv group, uint32_t heads, uint32_t P,
                      uint32_t D, uint32_t half, uint32_t lshift, uint32_t rot_lanes, uint32_t d2, float sgn) {
  constexpr int A = INTERLEAVED ? V / 2 : V;  // angles per lane
  const uint32_t lane = threadIdx.x & 31, sub = lane >> lshift, pk = lane & ((1u << lshift) - 1);
  const uint32_t rw = 32u >> lshift, rows = rw * U;  // rows per load instruction, per task
  const bool rot_lane = ROT && pk < rot_lanes, first = pk < d2;
  const uint32_t partner = INTERLEAVED || !rot_lane ? lane : first ? lane + d2 : lane - d2;
  const uint32_t j0 = INTERLEAVED ? pk * A : (first ? pk : pk - d2) * V;  // the lane's first angle
  const uint32_t warps = (gridDim.x * blockDim.x) >> 5;
  for (uint32_t w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < tasks; w += warps) {
    const uint32_t token = chunks.div(w), row0 = (w - token * chunks.d) * rows + sub;
    const uint32_t b = seq.div(token), s = token - b * seq.d;
    float c[A], sn[A];
    if (rot_lane) {
      load_f32<A>(cos + (size_t)s * half + j0, c);
      load_f32<A>(sin + (size_t)s * half + j0, sn);
    }
    // the token's row 0 in each tensor, then per row its tensor and the (group, head) offset
    const T* tq = dq + b * st.q[0] + s * st.q[1] + pk * V;
    const T* tk = dk + b * st.k[0] + s * st.k[1] + pk * V;
    const T* tv = dv + b * st.v[0] + s * st.v[1] + pk * V;
    uint4 x[U];
    bool qk[U];
#pragma unroll
    for (int i = 0; i < U; i++) {
      const uint32_t r = row0 + i * rw, g = group.div(r), h = r - g * group.d;
      const bool is_q = h < P, is_k = h == P;
      qk[i] = h <= P;
      const T* src = is_q ? tq + g * st.q[2] + h * st.q[3] : is_k ? tk + g * st.k[2] : tv + g * st.v[2];
      x[i] = r < heads ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
    }
    if constexpr (ROT) {
#pragma unroll
      for (int i = 0; i < U; i++) {
        uint4 y = x[i];  // NeoX: the partner lane's pack (all lanes take part in the shuffles)
        if constexpr (!INTERLEAVED) {
          y.x = __shfl_sync(0xffffffffu, x[i].x, partner);
          y.y = __shfl_sync(0xffffffffu, x[i].y, partner);
          y.z = __shfl_sync(0xffffffffu, x[i].z, partner);
          y.w = __shfl_sync(0xffffffffu, x[i].w, partner);
        }
        if (!rot_lane || !qk[i]) continue;  // v, or a pass-through pack: as it is
        float v[V], o[V];
        unpack<T, V>(x[i], v);
        if constexpr (INTERLEAVED) {
#pragma unroll
          for (int k = 0; k < V / 2; k++) {
            o[2 * k] = rotated_a(v[2 * k], v[2 * k + 1], c[k], sn[k], sgn);
            o[2 * k + 1] = rotated_b(v[2 * k], v[2 * k + 1], c[k], sn[k], sgn);
          }
        } else {
          unpack<T, V>(y, o);
#pragma unroll
          for (int k = 0; k < V; k++)
            o[k] = first ? rotated_a(v[k], o[k], c[k], sn[k], sgn) : rotated_b(o[k], v[k], c[k], sn[k], sgn);
        }
        x[i] = repack<T, V>(o);
      }
    }
    T* dst = out + ((size_t)token * heads + row0) * D + pk * V;
#pragma unroll
    for (int i = 0; i < U; i++)
      if (row0 + i * rw < heads) *reinterpret_cast<uint4*>(dst + (size_t)i * rw * D) = x[i];
  }
}

template <typename T, int V, int U>
static void launch_v5(const T* dq, const T* dk, const T* dv, const QKVGrads& st, T* dqkv, const float* cos,
                      const float* sin, uint32_t tasks, FastDiv chunks, uint32_t S, uint32_t heads, uint32_t P,
                      uint32_t D, uint32_t R, uint32_t lshift, bool interleaved, cudaStream_t stream) {
  auto kernel = R == 0        ? split_qkv_backward_v5<T, V, U, false, false>
                : interleaved ? split_qkv_backward_v5<T, V, U, true, true>
                              : split_qkv_backward_v5<T, V, U, true, false>;
  const int64_t wanted = (int64_t{tasks} + 7) / 8, wave = resident_blocks(kernel, 256);  // 8 warps a block
  const unsigned blocks = static_cast<unsigned>(wanted < wave ? wanted : wave);
  kernel<<<blocks, 256, 0, stream>>>(dq, dk, dv, st, dqkv, cos, sin, tasks, chunks, fast_div(S), fast_div(P + 2),
                                     heads, P, D, R / 2, lshift, R / V, R / (2 * V), -1.f);
}

// Returns the kernel run (ops.h): 5, 4, 1 (v4's scalar form), 0 (nothing to do), -1 (version 5 asked for where
// it does not apply).
template <typename T>
int split_qkv_backward_cuda(const T* dq, const T* dk, const T* dv, const int64_t* strides, T* dqkv, const float* cos,
                            const float* sin, int64_t B, int64_t S, int64_t G, int64_t P, int64_t D, int64_t R,
                            bool interleaved, int version, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T), U = 4;  // U: rows per lane in v5 (U 16-byte loads in flight)
  QKVGrads st;
  for (int i = 0; i < 4; i++) st.q[i] = strides[i];
  for (int i = 0; i < 3; i++) st.k[i] = strides[4 + i], st.v[i] = strides[7 + i];
  const int64_t tokens = B * S, heads = G * (P + 2);
  if (tokens == 0 || heads * D == 0) return 0;
  bool whole_packs = D % V == 0 && pack_width<T>(D, {dq, dk, dv, dqkv}) == V;
  for (int i = 0; i < 10; i++) whole_packs = whole_packs && strides[i] % V == 0;
  const int64_t rot_elems = interleaved ? R : R / 2;  // elements per head whose packs a rotating slot starts
  if (R > 0)  // as v3: float4 reads of the angles
    whole_packs = whole_packs && rot_elems % V == 0 && (R / 2) % 4 == 0 && reinterpret_cast<uintptr_t>(cos) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(sin) % 16 == 0;
  const int64_t slots = rot_elems / V + (D - R) / V, token_slots = heads * slots;
  const bool v4_fits = whole_packs && tokens < (int64_t{1} << 31) && token_slots < (int64_t{1} << 31) &&
                       D < (int64_t{1} << 31);
  // v5: a row is L = D / V lanes, a power of two up to a warp
  const int64_t L = D / V;
  int lshift = 0;
  while ((int64_t{1} << lshift) < L) lshift++;
  const int64_t task_rows = (32 >> lshift) * U, chunks = (heads + task_rows - 1) / task_rows;
  const bool v5_fits = v4_fits && L <= 32 && (int64_t{1} << lshift) == L && tokens * chunks < (int64_t{1} << 31) &&
                       heads + task_rows < (int64_t{1} << 31);
  if (v5_fits && version != 4) {
    launch_v5<T, V, U>(dq, dk, dv, st, dqkv, cos, sin, static_cast<uint32_t>(tokens * chunks),
                       fast_div(static_cast<uint32_t>(chunks)), (uint32_t)S, (uint32_t)heads, (uint32_t)P, (uint32_t)D,
                       (uint32_t)R, (uint32_t)lshift, interleaved, stream);
    return 5;
  }
  if (version == 5) return -1;
  if (v4_fits) {
    const int64_t passes = (token_slots + 511) / 512;  // balance the threads' slots across the passes
    const int threads = static_cast<int>(((token_slots + passes - 1) / passes + 31) / 32 * 32);
    auto kernel = interleaved ? split_qkv_backward_v4<T, V, true> : split_qkv_backward_v4<T, V, false>;
    kernel<<<static_cast<unsigned>(tokens), threads, 0, stream>>>(dq, dk, dv, st, dqkv, cos, sin, (uint32_t)S,
                                                                 (uint32_t)heads, (uint32_t)P, (uint32_t)D, (uint32_t)R,
                                                                 (uint32_t)slots, (uint32_t)(rot_elems / V), -1.f);
    return 4;
  }
  const int64_t total = tokens * heads * (D - R / 2), blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 32 * sm_count() ? blocks : 32 * sm_count());
  split_qkv_backward_v4_scalar<T><<<grid, 256, 0, stream>>>(dq, dk, dv, st, dqkv, cos, sin, total, S, G, P, D, R,
                                                            interleaved, -1.f);
  return 1;
}

// v6 (see the header): task w takes q/k rows [c RW U, c RW U + RW U) of token w / chunks, c = w % chunks (rows past the
// token's G (P + 1) idle); lane (sub, pk) = (lane / L, lane % L) takes pack pk of rows c RW U + i RW + sub, i < U.
// One pointer, no __restrict__ and no read-only-cache loads: every element is read, then written, by one thread.
template <typename T, int V, int U, bool INTERLEAVED>
__global__ void __launch_bounds__(256)
rotary_qkv_kernel_v6(T* x, const float* __restrict__ cos, const float* __restrict__ sin, uint32_t tasks,
                     FastDiv chunks, FastDiv seq, FastDiv heads, uint32_t rows, uint64_t token_elems, uint32_t lanes,
                     uint32_t rw, uint32_t D, uint32_t half, float sgn) {
  constexpr int A = INTERLEAVED ? V / 2 : V;  // angles (pairs) per lane
  constexpr int K = INTERLEAVED ? U : 2 * U;  // 16-byte packs per lane per task: NeoX [0, U) first halves, then second
  const uint32_t lane = threadIdx.x & 31, sub = lane / lanes, pk = lane - sub * lanes;
  if (sub >= rw) return;  // the 32 % L lanes past the last whole row (no shuffles or barriers below)
  const uint32_t j0 = pk * A;                     // the lane's first pair
  const uint32_t e0 = INTERLEAVED ? pk * V : j0;  // its pack's first element in a row (NeoX: the first half's)
  const uint32_t task_rows = rw * U, warps = (gridDim.x * blockDim.x) >> 5;
  for (uint32_t w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < tasks; w += warps) {
    const uint32_t token = chunks.div(w), row0 = (w - token * chunks.d) * task_rows + sub;
    const uint32_t s = token - seq.div(token) * seq.d;
    float c[A], sn[A];
    load_f32<A>(cos + (size_t)s * half + j0, c);
    load_f32<A>(sin + (size_t)s * half + j0, sn);
    T* xt = x + (size_t)token * token_elems + e0;
    uint32_t off[U];  // row r of the token is buffer head r + r / (P + 1): its offset from xt (a token < 2^32)
    uint4 p[K];
#pragma unroll
    for (int i = 0; i < U; i++) {  // all loads before any store (a store may alias a later load for the compiler)
      const uint32_t r = row0 + i * rw;
      off[i] = r < rows ? (r + heads.div(r)) * D : ~0u;
      if (off[i] != ~0u) {
        p[i] = *reinterpret_cast<const uint4*>(xt + off[i]);
        if constexpr (!INTERLEAVED) p[U + i] = *reinterpret_cast<const uint4*>(xt + off[i] + half);
      }
    }
#pragma unroll
    for (int i = 0; i < U; i++) {
      if (off[i] == ~0u) continue;
      float a[V], b[V];
      unpack<T, V>(p[i], a);
      if constexpr (INTERLEAVED) {
#pragma unroll
        for (int k = 0; k < A; k++) {
          b[2 * k] = rotated_a(a[2 * k], a[2 * k + 1], c[k], sn[k], sgn);
          b[2 * k + 1] = rotated_b(a[2 * k], a[2 * k + 1], c[k], sn[k], sgn);
        }
        *reinterpret_cast<uint4*>(xt + off[i]) = repack<T, V>(b);
      } else {
        float ya[V];
        unpack<T, V>(p[U + i], b);
#pragma unroll
        for (int k = 0; k < V; k++) {
          ya[k] = rotated_a(a[k], b[k], c[k], sn[k], sgn);
          b[k] = rotated_b(a[k], b[k], c[k], sn[k], sgn);
        }
        *reinterpret_cast<uint4*>(xt + off[i]) = repack<T, V>(ya);
        *reinterpret_cast<uint4*>(xt + off[i] + half) = repack<T, V>(b);
      }
    }
  }
}

// v7 (forced only, measured beside v6): v6's tasks and lanes with the loads made asynchronous. Each warp keeps S tasks
// in flight through its own shared memory: cp.async 16-byte copies of each lane's packs and of the token's cos and sin
// rows, S - 1 tasks ahead of the one it rotates. In-flight bytes are then bounded by shared memory (S - 1 tasks of
// 2 KB a warp) instead of by the registers that v6's loads hold (64 KB an SM at its occupancy). The lanes read back
// only their own pack slots; the angle rows (copied by all lanes) are read after the wait and a __syncwarp.
template <typename T, int V, int U, int S, bool INTERLEAVED>
__global__ void __launch_bounds__(256)
rotary_qkv_kernel_v7(T* x, const float* __restrict__ cos, const float* __restrict__ sin, uint32_t tasks,
                     FastDiv chunks, FastDiv seq, FastDiv heads, uint32_t rows, uint64_t token_elems, uint32_t lanes,
                     uint32_t rw, uint32_t D, uint32_t half, float sgn) {
  constexpr int A = INTERLEAVED ? V / 2 : V;
  constexpr int K = INTERLEAVED ? U : 2 * U;
  extern __shared__ uint4 smem_v7[];
  const uint32_t stage = K * 32 + half / 2;  // uint4s of a stage: [K][32 lanes] packs, then cos and sin (half each)
  uint4* ws = smem_v7 + (threadIdx.x >> 5) * S * stage;
  const uint32_t lane = threadIdx.x & 31, sub = lane / lanes, pk = lane - sub * lanes;
  const bool active = sub < rw;  // the 32 % L lanes past the last whole row copy angles only
  const uint32_t j0 = pk * A, e0 = INTERLEAVED ? pk * V : j0, task_rows = rw * U;
  const uint32_t warps = (gridDim.x * blockDim.x) >> 5;
  auto row_offset = [&](uint32_t r) { return (r + heads.div(r)) * D; };  // row r of a token: head r + r / (P + 1)
  auto issue = [&](uint32_t w, uint4* st) {  // queue task w's copies into stage st, close the group
    if (w < tasks) {
      const uint32_t token = chunks.div(w), row0 = (w - token * chunks.d) * task_rows + sub;
      const uint32_t s = token - seq.div(token) * seq.d;
      for (uint32_t c = lane; c < half / 2; c += 32) {  // half / 4 float4s of cos, then of sin
        const float* src = c < half / 4 ? cos + (size_t)s * half + 4 * c : sin + (size_t)s * half + 4 * (c - half / 4);
        __pipeline_memcpy_async(st + K * 32 + c, src, 16);
      }
      if (active) {
        const T* xt = x + (size_t)token * token_elems + e0;
#pragma unroll
        for (int i = 0; i < U; i++) {
          const uint32_t r = row0 + i * rw;
          if (r < rows) {
            __pipeline_memcpy_async(st + i * 32 + lane, xt + row_offset(r), 16);
            if constexpr (!INTERLEAVED) __pipeline_memcpy_async(st + (U + i) * 32 + lane, xt + row_offset(r) + half, 16);
          }
        }
      }
    }
    __pipeline_commit();
  };
  const uint32_t first = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
#pragma unroll
  for (int k = 0; k < S - 1; k++) issue(first + k * warps, ws + k * stage);
  uint32_t n = 0;
  for (uint32_t w = first; w < tasks; w += warps, n = (n + 1) % S) {
    issue(w + (S - 1) * warps, ws + ((n + S - 1) % S) * stage);
    __pipeline_wait_prior(S - 1);  // task w's group is complete
    __syncwarp();                  // and the angle rows other lanes copied are visible
    const uint4* st = ws + n * stage;
    if (active) {
      const float* cs = reinterpret_cast<const float*>(st + K * 32);
      float c[A], sn[A];
#pragma unroll
      for (int k = 0; k < A; k++) c[k] = cs[j0 + k], sn[k] = cs[half + j0 + k];
      const uint32_t token = chunks.div(w), row0 = (w - token * chunks.d) * task_rows + sub;
      T* xt = x + (size_t)token * token_elems + e0;
#pragma unroll
      for (int i = 0; i < U; i++) {
        const uint32_t r = row0 + i * rw;
        if (r >= rows) continue;
        T* xr = xt + row_offset(r);
        float a[V], b[V];
        unpack<T, V>(st[i * 32 + lane], a);
        if constexpr (INTERLEAVED) {
#pragma unroll
          for (int k = 0; k < A; k++) {
            b[2 * k] = rotated_a(a[2 * k], a[2 * k + 1], c[k], sn[k], sgn);
            b[2 * k + 1] = rotated_b(a[2 * k], a[2 * k + 1], c[k], sn[k], sgn);
          }
          *reinterpret_cast<uint4*>(xr) = repack<T, V>(b);
        } else {
          float ya[V];
          unpack<T, V>(st[(U + i) * 32 + lane], b);
#pragma unroll
          for (int k = 0; k < V; k++) {
            ya[k] = rotated_a(a[k], b[k], c[k], sn[k], sgn);
            b[k] = rotated_b(a[k], b[k], c[k], sn[k], sgn);
          }
          *reinterpret_cast<uint4*>(xr) = repack<T, V>(ya);
          *reinterpret_cast<uint4*>(xr + half) = repack<T, V>(b);
        }
      }
    }
    __syncwarp();  // every lane is done with stage n before a later issue refills it
  }
  __pipeline_wait_prior(0);  // nothing left queued at exit (the groups past the last task are empty)
}

template <typename T, int V, bool INTERLEAVED>
static void launch_rotary_qkv_v6(T* x, const float* cos, const float* sin, uint32_t tasks, uint32_t chunks,
                                 uint32_t S, uint32_t P, uint32_t rows, uint64_t token_elems, uint32_t lanes,
                                 uint32_t D, uint32_t R, float sgn, bool v7, cudaStream_t stream) {
  constexpr int U = INTERLEAVED ? 4 : 2;  // rows per lane: 4 16-byte loads in flight either way
  const int64_t wanted = (int64_t{tasks} + 7) / 8;  // 8 warps a block
  if (v7) {
    constexpr int ST = 4;  // stages a warp
    auto kernel = rotary_qkv_kernel_v7<T, V, U, ST, INTERLEAVED>;
    const size_t smem = size_t{8} * ST * ((INTERLEAVED ? U : 2 * U) * 32 + R / 4) * 16;
    allow_dynamic_smem(kernel, smem);
    const int64_t wave = resident_blocks(kernel, 256, smem);
    const unsigned blocks = static_cast<unsigned>(wanted < wave ? wanted : wave);
    kernel<<<blocks, 256, smem, stream>>>(x, cos, sin, tasks, fast_div(chunks), fast_div(S), fast_div(P + 1), rows,
                                          token_elems, lanes, 32 / lanes, D, R / 2, sgn);
    return;
  }
  auto kernel = rotary_qkv_kernel_v6<T, V, U, INTERLEAVED>;
  const int64_t wave = resident_blocks(kernel, 256);
  const unsigned blocks = static_cast<unsigned>(wanted < wave ? wanted : wave);
  kernel<<<blocks, 256, 0, stream>>>(x, cos, sin, tasks, fast_div(chunks), fast_div(S), fast_div(P + 1), rows,
                                     token_elems, lanes, 32 / lanes, D, R / 2, sgn);
}

// Returns the kernel run (ops.h): 7 (forced), 6, 3, 1 (v3's scalar form), 0 (nothing to do), -1 (version 6 or 7 asked
// for where it does not apply: nothing launched).
template <typename T>
int rotary_qkv_cuda(T* x, const float* cos, const float* sin, int64_t B, int64_t S, int64_t G, int64_t P, int64_t D,
                    int64_t R, bool interleaved, bool inverse, int version, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rot_elems = interleaved ? R : R / 2;  // elements per head whose packs a thread starts
  const int64_t rows = B * S * G * (P + 1), slots = rot_elems / V;
  const float sgn = inverse ? -1.f : 1.f;
  if (rows == 0) return 0;
  const bool whole_packs = D % V == 0 && rot_elems % V == 0 && (R / 2) % 4 == 0 && pack_width<T>(D, {x}) == V &&
                           reinterpret_cast<uintptr_t>(cos) % 16 == 0 && reinterpret_cast<uintptr_t>(sin) % 16 == 0;
  // v6: a row is L = slots lanes, at most a warp; tasks, a token's rows and its elements in 32 bits
  const int64_t tokens = B * S, token_rows = G * (P + 1);
  const int64_t task_rows = slots >= 1 && slots <= 32 ? (32 / slots) * (interleaved ? 4 : 2) : 1;
  const int64_t chunks = (token_rows + task_rows - 1) / task_rows;
  const bool v6_fits = whole_packs && slots >= 1 && slots <= 32 && tokens * chunks < (int64_t{1} << 31) &&
                       token_rows + task_rows < (int64_t{1} << 31) && S * (R / 2) < (int64_t{1} << 31) &&
                       G * (P + 2) * D < (int64_t{1} << 32) && B * S * G * (P + 2) * D < (int64_t{1} << 40);
  if (v6_fits && version >= 6) {  // forced only: v3 measured faster on the H200 (session 20: v6 0.95x, v7 0.94-0.96x of v3)
    const uint64_t token_elems = static_cast<uint64_t>(G * (P + 2) * D);
    const uint32_t tasks = static_cast<uint32_t>(tokens * chunks), lanes = static_cast<uint32_t>(slots);
    if (interleaved)
      launch_rotary_qkv_v6<T, V, true>(x, cos, sin, tasks, (uint32_t)chunks, (uint32_t)S, (uint32_t)P,
                                       (uint32_t)token_rows, token_elems, lanes, (uint32_t)D, (uint32_t)R, sgn,
                                       version == 7, stream);
    else
      launch_rotary_qkv_v6<T, V, false>(x, cos, sin, tasks, (uint32_t)chunks, (uint32_t)S, (uint32_t)P,
                                        (uint32_t)token_rows, token_elems, lanes, (uint32_t)D, (uint32_t)R, sgn,
                                        version == 7, stream);
    return version == 7 ? 7 : 6;
  }
  if (version >= 6) return -1;
  if (whole_packs && rows * slots < (int64_t{1} << 31) && B * S * G * (P + 2) * D < (int64_t{1} << 40)) {
    const uint32_t total = static_cast<uint32_t>(rows * slots), blocks = (total + 255) / 256;
    auto kernel = interleaved ? rotary_qkv_kernel_v3<T, V, true> : rotary_qkv_kernel_v3<T, V, false>;
    kernel<<<blocks, 256, 0, stream>>>(x, cos, sin, total, (uint32_t)slots, (uint32_t)(P + 1), (uint32_t)(G * (P + 1)),
                                       (uint32_t)S, (uint32_t)D, (uint32_t)R, sgn);
    return 3;
  }
  const int64_t total = rows * (R / 2), blocks = (total + 255) / 256;
  const int grid = static_cast<int>(blocks < 32 * sm_count() ? blocks : 32 * sm_count());
  rotary_qkv_kernel_v3_scalar<T><<<grid, 256, 0, stream>>>(x, cos, sin, total, P + 1, G * (P + 1), S, D, R,
                                                           interleaved, sgn);
  return 1;
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
  template int rotary_qkv_cuda<T>(T*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                  int64_t, bool, bool, int, cudaStream_t);                              \
  template void rotary_cuda<T>(const T*, const float*, const float*, T*, int64_t, int64_t, int64_t, int64_t, \
                               int64_t, bool, bool, cudaStream_t);                                   \
  template int split_qkv_backward_cuda<T>(const T*, const T*, const T*, const int64_t*, T*, const float*,    \
                                          const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, \
                                          int, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
