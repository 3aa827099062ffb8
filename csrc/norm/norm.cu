// LayerNorm / RMSNorm on CUDA, forward and backward, optional fused residual add. Math as norm_cpu.cpp.
//
// v1: forward = one block per row, 16-byte packs, three sweeps over the row (sum, centred sum of
//   squares, normalise); the row is re-read from L1/L2, so DRAM sees it once. Any C.
//   backward = a persistent grid of ~4 blocks per SM walking rows; per row two sweeps (the two dot
//   products, then dx). dw/db accumulate in shared memory, each column owned by one thread (no atomics),
//   and a second kernel sums the per-block partials.
// v2 (removed; v3 covers every size it took): v1 with the row cached in registers.
// All versions take weight/bias (and write dw/db) as fp32 or as the activations' 16-bit type (W).
// v3: the row lives in registers: a block of <= 256 threads covers it with P packs per thread
//   (C <= 1024 packs, i.e. 8192 bf16/fp16, 4096 fp32, 1024 unaligned), and takes R rows at once so that
//   R * P independent 16-byte loads are in flight per thread and the R row reductions share two barriers
//   (block_sum_k). w/b are read as float4. Forward: one block per R rows. Backward: a one-wave persistent
//   grid, each block a contiguous band of rows; since a thread owns the same columns in every row, its
//   dw/db partials stay in registers and are written once per block; column_sum_v2 (a 32 x 32 tiled,
//   deterministic reduction) adds the per-block rows. v1 remains for wider rows (with column_sum_v2
//   in place of its old one-thread-per-column serial sum). The backward may issue the next rows' loads
//   before reducing the current ones (PREFETCH), where registers allow.
// v4 (backward, packed rows of 129-512 packs): v3's grid and register-held dw/db, with the rows streamed
//   through shared memory by cp.async, S - 1 rows ahead, so loads stay in flight across the row reductions
//   without holding registers. 1.1-1.2x faster than v3 at C = 2048 and 4096 (bf16). The same staging
//   made the forward slower (46-52 us against v3's 41-44 at C = 4096), so the forward stays v3.
// dual forward (dual_norm, the parallel residual's two norms of one x): the v3 forward with DUAL, which writes
//   y2 = norm(x; w2, b2) from the same registers after y1 (one read of x: 3 passes where two forwards make 4);
//   above kMaxPacks packs, v1 twice. Not yet timed on a GPU.
// dual backward (dual_norm's, with both norms' grads): v4 and v3 with DUAL. The norms share x, mean and rstd and
//   LayerNorm's input grad is linear in g = dy * w, so one pass with g = dy1 * w1 + dy2 * w2 gives
//   dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)) (RMSNorm without mean(g)), rounded once: reads dy1,
//   dy2, x, dh and writes dx, 5 passes where two norm backwards chained through dh make 8. dw1, dw2, db1, db2
//   accumulate in registers and one column_sum_v2 of 4C (2C) columns reduces them. The second weight and two
//   more accumulators cost registers: v4 DUAL runs 2 blocks of 256 threads per SM (P = 1, C <= 256 packs; single:
//   3) or one of 512 (257-512 packs, P = 1; single: P = 2, 2 blocks), v3 DUAL without prefetch. 16-bit rows
//   of 513-1024 packs (bf16 hidden 4104-8192) would spill and, like rows over kMaxPacks packs, keep two calls.
//   The single-norm kernels compile to the same SASS as before the flag. Not yet timed on a GPU.
#include <algorithm>
#include <type_traits>

#include <cuda_pipeline.h>

#include "../common/cuda_common.cuh"

namespace neox {

// Weight and bias as stored: fp32, or the activations' 16-bit type (how bf16/fp16 engines keep them);
// reading them as they are spares a cast launch before the forward and after the backward.
template <typename W, int V>
__device__ __forceinline__ void load_param(const W* p, float (&out)[V]) {
  if constexpr (std::is_same<W, float>::value) load_f32<V>(p, out);
  else load<W, V>(p, out);
}

template <typename T, typename W, int V>
__global__ void norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ res, const W* __restrict__ w,
                                    const W* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
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
    for (int i = 0; i < V; i++) v[i] = (v[i] - mean) * rstd * to_f(w[c + i]) + (b ? to_f(b[c + i]) : 0.f);
    store<T, V>(y + row * C + c, v);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, typename W, int V>
__global__ void norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
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
        const float gw = g[i] * to_f(w[c + i]), xh = (hv[i] - m) * s;
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
        g[i] = s * (g[i] * to_f(w[c + i]) - a - xh * bb) + (dh ? e[i] : 0.f);
      }
      store<T, V>(dx + row * C + c, g);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) part[blockIdx.x * 2 * C + c] = smem[c];
}


// ---- v3 ----
// Packs of a row: thread t holds packs k * blockDim.x + t, k < P (coalesced for each k). Loaded packs stay
// raw (4 registers per 8 bf16) and are widened to fp32 where used: fewer registers, more blocks per SM,
// more loads in flight.

template <typename T, int V>
__device__ __forceinline__ void widen(const Pack<T, V>& p, float (&out)[V]) {
#pragma unroll
  for (int i = 0; i < V; i++) out[i] = to_f(p.d[i]);
}
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> zero_pack() {
  Pack<T, V> p;
#pragma unroll
  for (int i = 0; i < V; i++) p.d[i] = from_f<T>(0.f);
  return p;
}

// y = (row - mean) * rstd * w + b for the R rows a v3 forward block holds in registers (raw).
template <typename T, typename W, int V, int P, int R>
__device__ __forceinline__ void write_normed_v3(const Pack<T, V> (&raw)[R][P], const float (&mean)[R],
                                                const float (&rstd)[R], const W* __restrict__ w,
                                                const W* __restrict__ b, T* __restrict__ y, int64_t row0, int64_t N,
                                                int64_t C) {
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
      float wv[V], bv[V];
      load_param<W, V>(w + c, wv);
      if (b) {
        load_param<W, V>(b + c, bv);
      } else {
#pragma unroll
        for (int i = 0; i < V; i++) bv[i] = 0.f;
      }
#pragma unroll
      for (int r = 0; r < R; r++) {
        if (row0 + r < N) {
          float o[V];
#pragma unroll
          for (int i = 0; i < V; i++) o[i] = (to_f(raw[r][k].d[i]) - mean[r]) * rstd[r] * wv[i] + bv[i];
          store<T, V>(y + (row0 + r) * C + c, o);
        }
      }
    }
  }
}

// The second norm of the same rows (DUAL: dual_norm, the parallel residual's two norms of one x).
template <typename T, typename W>
struct SecondNorm {
  const W* w;
  const W* b;
  T* y;
};

// MINB: blocks per SM the register budget is cut for (launch bounds); the launchers pick the most that
// compile without spills for each (P, R). DUAL: also y2 = norm(x; second.w, second.b) from the same registers.
template <typename T, typename W, int V, int P, int R, int MINB, int MAXT = 256, bool DUAL = false>
__global__ void __launch_bounds__(MAXT, MINB)
norm_forward_kernel_v3(const T* __restrict__ x, const T* __restrict__ res, const W* __restrict__ w,
                       const W* __restrict__ b, T* __restrict__ y, T* __restrict__ h,
                       float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t N, int64_t C, float eps,
                       bool rms, SecondNorm<T, W> second = {}) {
  using PK = Pack<T, V>;
  __shared__ float scratch[32 * R];
  const int64_t row0 = (int64_t)blockIdx.x * R;
  PK raw[R][P];  // x, then h = x + residual; zero outside the rows and the row length
  // All loads first: R * P (twice with a residual) independent 16-byte loads in flight.
#pragma unroll
  for (int r = 0; r < R; r++) {
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      raw[r][k] = row0 + r < N && c < C ? *reinterpret_cast<const PK*>(x + (row0 + r) * C + c) : zero_pack<T, V>();
    }
  }
  if (res) {  // h = x + residual, stored in T; the statistics use the stored (rounded) values
    PK e[R][P];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
      for (int k = 0; k < P; k++) {
        const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
        e[r][k] = row0 + r < N && c < C ? *reinterpret_cast<const PK*>(res + (row0 + r) * C + c) : zero_pack<T, V>();
      }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
      for (int k = 0; k < P; k++) {
        const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
#pragma unroll
        for (int i = 0; i < V; i++) raw[r][k].d[i] = from_f<T>(to_f(raw[r][k].d[i]) + to_f(e[r][k].d[i]));
        if (row0 + r < N && c < C) *reinterpret_cast<PK*>(h + (row0 + r) * C + c) = raw[r][k];
      }
    }
  }
  float mean[R], rstd[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    mean[r] = 0.f;
    if (!rms) {
#pragma unroll
      for (int k = 0; k < P; k++) {
#pragma unroll
        for (int i = 0; i < V; i++) mean[r] += to_f(raw[r][k].d[i]);  // out-of-range entries are 0
      }
    }
  }
  if (!rms) {
    block_sum_k<R>(mean, scratch);
#pragma unroll
    for (int r = 0; r < R; r++) mean[r] /= C;
  }
#pragma unroll
  for (int r = 0; r < R; r++) {
    rstd[r] = 0.f;
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      if (c < C) {
#pragma unroll
        for (int i = 0; i < V; i++) {
          const float d = to_f(raw[r][k].d[i]) - mean[r];
          rstd[r] += d * d;
        }
      }
    }
  }
  block_sum_k<R>(rstd, scratch);
#pragma unroll
  for (int r = 0; r < R; r++) rstd[r] = rsqrtf(rstd[r] / C + eps);
  write_normed_v3<T, W, V, P, R>(raw, mean, rstd, w, b, y, row0, N, C);
  if constexpr (DUAL) write_normed_v3<T, W, V, P, R>(raw, mean, rstd, second.w, second.b, second.y, row0, N, C);
  if (threadIdx.x < R && row0 + threadIdx.x < N) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (r == threadIdx.x) {  // constant register index
        mean_out[row0 + r] = mean[r];
        rstd_out[row0 + r] = rstd[r];
      }
    }
  }
}

// The second norm's grad (DUAL: dual_norm's backward, both norms of one x in one kernel; see v4).
template <typename T, typename W>
struct SecondGrad {
  const T* dy;
  const W* w;
};

// Each block takes rows [N * b / G, N * (b + 1) / G) of G = gridDim.x and writes part[b] = [dw | db]
// (DUAL: [dw1 | dw2 | db1 | db2], as v4).
template <typename T, typename W, int V, int P, int R, int MINB, bool PREFETCH, int MAXT, bool HAS_DH,
          bool DUAL = false>
__global__ void __launch_bounds__(MAXT, MINB)
norm_backward_kernel_v3(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
                        const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dh,
                        T* __restrict__ dx, float* __restrict__ part, int64_t N, int64_t C, bool rms,
                        SecondGrad<T, W> second = {}) {
  using PK = Pack<T, V>;
  constexpr int P2 = DUAL ? P : 1;  // the second norm's arrays: none unless DUAL
  __shared__ float scratch[32 * 2 * R];
  const int64_t r_begin = N * blockIdx.x / gridDim.x, r_end = N * (blockIdx.x + 1) / gridDim.x;
  float wv[P][V], acc_w[P][V], acc_b[P][V];
  float wv2[P2][V], acc_w2[P2][V], acc_b2[P2][V];
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
      load_param<W, V>(w + c, wv[k]);
      if constexpr (DUAL) load_param<W, V>(second.w + c, wv2[k]);
    } else {
#pragma unroll
      for (int i = 0; i < V; i++) wv[k][i] = 0.f;
      if constexpr (DUAL) {
#pragma unroll
        for (int i = 0; i < V; i++) wv2[k][i] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < V; i++) acc_w[k][i] = acc_b[k][i] = 0.f;
    if constexpr (DUAL) {
#pragma unroll
      for (int i = 0; i < V; i++) acc_w2[k][i] = acc_b2[k][i] = 0.f;
    }
  }
  // Rows [row0, row0 + R) of dy, h, dh (the residual's grad, if any) and dy2 (DUAL) into registers; zero
  // outside the band and the row, so they add nothing.
  auto load_rows = [&](int64_t row0, PK (&gp)[R][P], PK (&hp)[R][P], PK (&ep)[R][P], PK (&gp2)[R][P2], float (&m)[R],
                       float (&s)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
      const bool live = row0 + r < r_end;
      m[r] = live ? mean[row0 + r] : 0.f;
      s[r] = live ? rstd[row0 + r] : 0.f;
#pragma unroll
      for (int k = 0; k < P; k++) {
        const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
        const bool in = live && c < C;
        gp[r][k] = in ? *reinterpret_cast<const PK*>(dy + (row0 + r) * C + c) : zero_pack<T, V>();
        hp[r][k] = in ? *reinterpret_cast<const PK*>(h + (row0 + r) * C + c) : zero_pack<T, V>();
        if constexpr (HAS_DH) ep[r][k] = in ? *reinterpret_cast<const PK*>(dh + (row0 + r) * C + c) : zero_pack<T, V>();
        if constexpr (DUAL) gp2[r][k] = in ? *reinterpret_cast<const PK*>(second.dy + (row0 + r) * C + c) : zero_pack<T, V>();
      }
    }
  };
  PK gp[R][P], hp[R][P], ep[R][P], gp2[R][P2];
  float m[R], s[R];
  load_rows(r_begin, gp, hp, ep, gp2, m, s);
  for (int64_t row0 = r_begin; row0 < r_end; row0 += R) {
    // PREFETCH: the next rows' loads are issued now, so they are in flight during this step's reduction and
    // dx (more registers: it pays where they are free)
    PK gn[R][P], hn[R][P], en[R][P], gn2[R][P2];
    float mn[R], sn[R];
    if constexpr (PREFETCH) load_rows(row0 + R, gn, hn, en, gn2, mn, sn);
    float sums[2 * R];  // [sum(g*w) for each row | sum(g*w*xhat) for each row]; DUAL: g*w = dy1*w1 + dy2*w2
#pragma unroll
    for (int r = 0; r < R; r++) {
      sums[r] = sums[R + r] = 0.f;
#pragma unroll
      for (int k = 0; k < P; k++) {
#pragma unroll
        for (int i = 0; i < V; i++) {
          const float g = to_f(gp[r][k].d[i]), xh = (to_f(hp[r][k].d[i]) - m[r]) * s[r];
          float gw = g * wv[k][i];
          if constexpr (DUAL) {
            const float g2 = to_f(gp2[r][k].d[i]);
            gw += g2 * wv2[k][i];
            acc_w2[k][i] += g2 * xh;
            acc_b2[k][i] += g2;
          }
          sums[r] += gw;
          sums[R + r] += gw * xh;
          acc_w[k][i] += g * xh;
          acc_b[k][i] += g;
        }
      }
    }
    block_sum_k<2 * R>(sums, scratch);
#pragma unroll
    for (int r = 0; r < R; r++) {
      const float a = rms ? 0.f : sums[r] / C, bb = sums[R + r] / C;
      if (row0 + r < r_end) {
#pragma unroll
        for (int k = 0; k < P; k++) {
          const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
          if (c < C) {
            float e[V];
            if constexpr (HAS_DH) {
              widen<T, V>(ep[r][k], e);
            } else {
#pragma unroll
              for (int i = 0; i < V; i++) e[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < V; i++) {
              const float g = to_f(gp[r][k].d[i]), xh = (to_f(hp[r][k].d[i]) - m[r]) * s[r];
              float gw = g * wv[k][i];
              if constexpr (DUAL) gw += to_f(gp2[r][k].d[i]) * wv2[k][i];
              e[i] += s[r] * (gw - a - xh * bb);
            }
            store<T, V>(dx + (row0 + r) * C + c, e);
          }
        }
      }
    }
    if constexpr (PREFETCH) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        m[r] = mn[r];
        s[r] = sn[r];
#pragma unroll
        for (int k = 0; k < P; k++) {
          gp[r][k] = gn[r][k];
          hp[r][k] = hn[r][k];
          if constexpr (HAS_DH) ep[r][k] = en[r][k];
          if constexpr (DUAL) gp2[r][k] = gn2[r][k];
        }
      }
    } else {
      load_rows(row0 + R, gp, hp, ep, gp2, m, s);
    }
  }
  constexpr int D = DUAL ? 2 : 1;  // norms
  float* pw = part + blockIdx.x * 2 * D * C;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
      store_f32<V>(pw + c, acc_w[k]);
      if (!rms) store_f32<V>(pw + D * C + c, acc_b[k]);
      if constexpr (DUAL) {
        store_f32<V>(pw + C + c, acc_w2[k]);
        if (!rms) store_f32<V>(pw + 3 * C + c, acc_b2[k]);
      }
    }
  }
}

// ---- v4 ----
// Rows stream through shared memory: each thread copies its own packs of the row S - 1 ahead with cp.async
// (16-byte copies that hold no registers while in flight, so S - 1 rows per block are in flight at any
// occupancy), waits for the current row's copies, then works as v3 with one row per step. A thread only
// ever reads the slots it filled itself, so no barrier guards the stages: the row reductions' barriers
// are the only ones. Packed rows only (V * sizeof(T) == 16). RMS is a template flag here: RMSNorm then
// keeps no db accumulator and does one reduction per row.
template <typename T, int V, int P, int NT>
struct RowStages {  // [S][NT tensors][P packs][blockDim.x] packs in dynamic shared memory
  using PK = Pack<T, V>;
  PK* base;
  __device__ __forceinline__ PK* slot(int s, int tensor, int k) const {
    return base + ((s * NT + tensor) * P + k) * (int)blockDim.x + threadIdx.x;
  }
  // Queue the copies of `row` (skipped when the row is outside [.., end)) and close the group.
  __device__ __forceinline__ void issue(int s, int64_t row, int64_t end, int64_t C, const T* const* src) const {
    if (row < end) {
#pragma unroll
      for (int k = 0; k < P; k++) {
        const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
        if (c < C) {
#pragma unroll
          for (int j = 0; j < NT; j++) __pipeline_memcpy_async(slot(s, j, k), src[j] + row * C + c, sizeof(PK));
        }
      }
    }
    __pipeline_commit();
  }
  __device__ __forceinline__ void read(int s, int tensor, int64_t C, PK (&out)[P]) const {
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      out[k] = c < C ? *slot(s, tensor, k) : zero_pack<T, V>();
    }
  }
  static constexpr size_t bytes(int S, int threads) { return (size_t)S * NT * P * threads * sizeof(PK); }
};

// Each block takes rows [N * b / G, N * (b + 1) / G) of G = gridDim.x and writes part[b] = [dw | db].
// DUAL (dual_norm's backward: two norms of the same x, so the same mean/rstd and xhat): LayerNorm's input grad
// is linear in g = dy * w, so both norms' come from one pass with g = dy1 * w1 + dy2 * w2,
// dx = dh + rstd * (g - mean(g) - xhat * mean(g * xhat)); dy2 is staged as a fourth (third without dh)
// tensor, and part[b] = [dw1 | dw2 | db1 | db2] (4C columns; RMS: the first 2C).
template <typename T, typename W, int V, int P, int S, int MINB, int MAXT, bool HAS_DH, bool RMS, bool DUAL = false>
__global__ void __launch_bounds__(MAXT, MINB)
norm_backward_kernel_v4(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
                        const float* __restrict__ mean, const float* __restrict__ rstd, const T* __restrict__ dh,
                        T* __restrict__ dx, float* __restrict__ part, int64_t N, int64_t C,
                        SecondGrad<T, W> second = {}) {
  using PK = Pack<T, V>;
  constexpr int NT = (HAS_DH ? 3 : 2) + (DUAL ? 1 : 0);
  constexpr int P2 = DUAL ? P : 1, D = DUAL ? 2 : 1;  // the second norm's arrays: none unless DUAL
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const RowStages<T, V, P, NT> st{reinterpret_cast<PK*>(smem_raw)};
  __shared__ float scratch[32 * 2];
  const int64_t r_begin = N * blockIdx.x / gridDim.x, r_end = N * (blockIdx.x + 1) / gridDim.x;
  const T* const src[4] = {dy, h, HAS_DH ? dh : second.dy, second.dy};  // dy2 is tensor NT - 1
  float wv[P][V], acc_w[P][V], acc_b[RMS ? 1 : P][V];
  float wv2[P2][V], acc_w2[P2][V], acc_b2[RMS ? 1 : P2][V];
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
#pragma unroll
    for (int i = 0; i < V; i++) wv[k][i] = acc_w[k][i] = 0.f;
    if (c < C) load_param<W, V>(w + c, wv[k]);
    if constexpr (!RMS) {
#pragma unroll
      for (int i = 0; i < V; i++) acc_b[k][i] = 0.f;
    }
    if constexpr (DUAL) {
#pragma unroll
      for (int i = 0; i < V; i++) wv2[k][i] = acc_w2[k][i] = 0.f;
      if (c < C) load_param<W, V>(second.w + c, wv2[k]);
      if constexpr (!RMS) {
#pragma unroll
        for (int i = 0; i < V; i++) acc_b2[k][i] = 0.f;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < S - 1; i++) st.issue(i, r_begin + i, r_end, C, src);
  int s = 0;
  for (int64_t row = r_begin; row < r_end; row++) {
    st.issue(s == 0 ? S - 1 : s - 1, row + S - 1, r_end, C, src);  // the slot read one step ago
    const float m = RMS ? 0.f : mean[row], rs = rstd[row];
    __pipeline_wait_prior(S - 1);
    PK gp[P], hp[P], gp2[P2];
    st.read(s, 0, C, gp);
    st.read(s, 1, C, hp);
    if constexpr (DUAL) st.read(s, NT - 1, C, gp2);
    float sums[2] = {0.f, 0.f};  // sum(g*w), sum(g*w*xhat)
#pragma unroll
    for (int k = 0; k < P; k++) {
#pragma unroll
      for (int i = 0; i < V; i++) {
        const float g = to_f(gp[k].d[i]), xh = (to_f(hp[k].d[i]) - m) * rs;
        float gw = g * wv[k][i];
        if constexpr (DUAL) {
          const float g2 = to_f(gp2[k].d[i]);
          gw += g2 * wv2[k][i];
          acc_w2[k][i] += g2 * xh;
          if constexpr (!RMS) acc_b2[k][i] += g2;
        }
        sums[0] += gw;
        sums[1] += gw * xh;
        acc_w[k][i] += g * xh;
        if constexpr (!RMS) acc_b[k][i] += g;
      }
    }
    if constexpr (RMS) {
      sums[1] = block_sum(sums[1], scratch);
    } else {
      block_sum_k<2>(sums, scratch);
    }
    const float a = RMS ? 0.f : sums[0] / C, bb = sums[1] / C;
    PK ep[P];
    if constexpr (HAS_DH) st.read(s, 2, C, ep);
#pragma unroll
    for (int k = 0; k < P; k++) {
      const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
      if (c < C) {
        float e[V];
#pragma unroll
        for (int i = 0; i < V; i++) {
          const float g = to_f(gp[k].d[i]), xh = (to_f(hp[k].d[i]) - m) * rs;
          float gw = g * wv[k][i];
          if constexpr (DUAL) gw += to_f(gp2[k].d[i]) * wv2[k][i];
          e[i] = rs * (gw - a - xh * bb) + (HAS_DH ? to_f(ep[k].d[i]) : 0.f);
        }
        store<T, V>(dx + row * C + c, e);
      }
    }
    s = s + 1 == S ? 0 : s + 1;
  }
  float* pw = part + blockIdx.x * 2 * D * C;
#pragma unroll
  for (int k = 0; k < P; k++) {
    const int64_t c = (k * (int64_t)blockDim.x + threadIdx.x) * V;
    if (c < C) {
      store_f32<V>(pw + c, acc_w[k]);
      if constexpr (!RMS) store_f32<V>(pw + D * C + c, acc_b[k]);
      if constexpr (DUAL) {
        store_f32<V>(pw + C + c, acc_w2[k]);
        if constexpr (!RMS) store_f32<V>(pw + 3 * C + c, acc_b2[k]);
      }
    }
  }
}

// v3 covers C <= kMaxPacks packs with blocks of <= 256 threads (the backward: 512 for 257-512 packs).
// (P, R, MINB) per size class were picked with variant sweeps on an H200 (bf16, 8192 rows; bench/RESULTS.md,
// 2026-11-26): forward C = 2048 (1, 4, 3) 29 us vs 30-34 for R = 1, 2, 8; C = 4096 (4, 1, 3) 43-46 us vs
// 48-63 for P = 2 with R = 1, 2, 4 and 51-60 for 512-thread blocks. Backward, with bf16 weights:
// C = 2048 (1, 2, 2) with the next rows prefetched 41-43 us vs 44-47 without, 50-52 for R = 4 and 77 for
// (1, 2, 3), which spills; C = 4096 (1, 2, 1) in 512-thread blocks, prefetched, 74-76 us vs 75-78 for
// (2, 1, 2) and 86-100 for the other 512-thread variants. With a residual's grad (dh, loaded with dy and
// h): C = 2048 (1, 2, 2) 51 us with or without prefetch; C = 4096 (2, 1, 2) 89-90 us vs 95-136 for the
// 512-thread variants, which spill.
// v4 backward (P packs per thread, S stages, MINB), same harness, a later call: C = 2048 (1, 3, 3) RMSNorm
// 35.5 us against v3's 40.8, LayerNorm 41.1 vs 41.8-42.5, with dh 46.1 vs 51.0 (S = 4, 6 and 128-thread
// blocks 36-43); C = 4096 (2, 2, 2) RMSNorm 61.3 vs 74.6, LayerNorm 68.2 vs 76.8, with dh 80.2 vs 89.0
// (S = 3, 4: 1-4 us slower; 512-thread blocks with MINB 1: 68-77).
constexpr int64_t kMaxPacks = 1024;
inline int threads_for(int64_t packs, int P) { return static_cast<int>((packs + P - 1) / P + 31) / 32 * 32; }

template <typename T, typename W, int V, int P, int R, int MINB, bool DUAL = false>
void launch_forward_v3(const T* x, const T* residual, const W* w, const W* b, T* y, T* h, float* mean,
                       float* rstd, int64_t N, int64_t C, float eps, bool rms, cudaStream_t stream,
                       SecondNorm<T, W> second = {}) {
  const int threads = threads_for(C / V, P);
  norm_forward_kernel_v3<T, W, V, P, R, MINB, 256, DUAL><<<(N + R - 1) / R, threads, 0, stream>>>(
      x, residual, w, b, y, h, mean, rstd, N, C, eps, rms, second);
}

template <typename T, typename W, int V, int P, int R, int MINB, bool PREFETCH, int MAXT = 256, bool DUAL = false>
int launch_backward_v3(const T* dy, const T* h, const W* w, const float* mean, const float* rstd, const T* dh,
                       T* dx, float* part, int64_t part_rows, int64_t N, int64_t C, bool rms, cudaStream_t stream,
                       SecondGrad<T, W> second = {}) {
  const int threads = threads_for(C / V, P);
  // with a residual, its grad dh is loaded with dy and h (and prefetched with them); without, no registers
  auto kernel = dh ? norm_backward_kernel_v3<T, W, V, P, R, MINB, PREFETCH, MAXT, true, DUAL>
                   : norm_backward_kernel_v3<T, W, V, P, R, MINB, PREFETCH, MAXT, false, DUAL>;
  const int64_t blocks = std::min<int64_t>({(int64_t)resident_blocks(kernel, threads), part_rows, (N + R - 1) / R});
  kernel<<<blocks, threads, 0, stream>>>(dy, h, w, mean, rstd, dh, dx, part, N, C, rms, second);
  return static_cast<int>(blocks);
}

// v4: the same one-wave persistent grid as the v3 backward, sized with its shared memory. Returns the blocks.
template <typename T, typename W, int V, int P, int S, int MINB, int MAXT, bool DUAL = false>
int launch_backward_v4(const T* dy, const T* h, const W* w, const float* mean, const float* rstd, const T* dh,
                       T* dx, float* part, int64_t part_rows, int64_t N, int64_t C, bool rms, cudaStream_t stream,
                       SecondGrad<T, W> second = {}) {
  const int threads = threads_for(C / V, P);
  auto kernel = dh ? (rms ? norm_backward_kernel_v4<T, W, V, P, S, MINB, MAXT, true, true, DUAL>
                          : norm_backward_kernel_v4<T, W, V, P, S, MINB, MAXT, true, false, DUAL>)
                   : (rms ? norm_backward_kernel_v4<T, W, V, P, S, MINB, MAXT, false, true, DUAL>
                          : norm_backward_kernel_v4<T, W, V, P, S, MINB, MAXT, false, false, DUAL>);
  const int tensors = (dh ? 3 : 2) + (DUAL ? 1 : 0);  // staged: dy, h [, dh] [, dy2]
  const size_t smem = RowStages<T, V, P, 1>::bytes(S, threads) * tensors;
  allow_dynamic_smem(kernel, smem);
  const int64_t blocks = std::min<int64_t>({(int64_t)resident_blocks(kernel, threads, smem), part_rows, N});
  if (blocks == 0) return 0;  // no block fits (or no rows): not taken, nothing launched (a grid of 0 is an error)
  kernel<<<blocks, threads, smem, stream>>>(dy, h, w, mean, rstd, dh, dx, part, N, C, second);
  return static_cast<int>(blocks);
}

template <typename T, typename W>
void norm_forward_cuda(const T* x, const T* residual, const W* w, const W* b, T* y, T* h, float* mean,
                       float* rstd, int64_t N, int64_t C, float eps, bool rms, cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, residual, y, h, w, b});
  NEOX_WITH_PACK(T, vec, {
    const int64_t packs = C / V;
    if (packs > kMaxPacks) {
      norm_forward_kernel<T, W, V><<<N, row_threads(packs), 0, stream>>>(x, residual, w, b, y, h, mean, rstd, C, eps, rms);
    } else {
      if (packs <= 256) launch_forward_v3<T, W, V, 1, 4, 3>(x, residual, w, b, y, h, mean, rstd, N, C, eps, rms, stream);
      else launch_forward_v3<T, W, V, 4, 1, 3>(x, residual, w, b, y, h, mean, rstd, N, C, eps, rms, stream);
    }
  });
}

// dual_norm's forward: y1 = norm(x; w1, b1) and y2 = norm(x; w2, b2) with one read of x (v3, the rows in
// registers); rows over kMaxPacks packs run v1 twice (the same statistics, written twice).
template <typename T, typename W>
void norm_dual_forward_cuda(const T* x, const W* w1, const W* b1, const W* w2, const W* b2, T* y1, T* y2, float* mean,
                            float* rstd, int64_t N, int64_t C, float eps, bool rms, cudaStream_t stream) {
  const int vec = pack_width<T>(C, {x, y1, y2, w1, b1, w2, b2});
  NEOX_WITH_PACK(T, vec, {
    const int64_t packs = C / V;
    const SecondNorm<T, W> second{w2, b2, y2};
    if (packs > kMaxPacks) {
      norm_forward_kernel<T, W, V><<<N, row_threads(packs), 0, stream>>>(x, nullptr, w1, b1, y1, nullptr, mean, rstd, C,
                                                                           eps, rms);
      norm_forward_kernel<T, W, V><<<N, row_threads(packs), 0, stream>>>(x, nullptr, w2, b2, y2, nullptr, mean, rstd, C,
                                                                           eps, rms);
    } else if (packs <= 256) {
      launch_forward_v3<T, W, V, 1, 4, 3, true>(x, nullptr, w1, b1, y1, nullptr, mean, rstd, N, C, eps, rms, stream, second);
    } else {
      launch_forward_v3<T, W, V, 4, 1, 3, true>(x, nullptr, w1, b1, y1, nullptr, mean, rstd, N, C, eps, rms, stream, second);
    }
  });
}

template <typename T, typename W>
void norm_backward_cuda(const T* dy, const T* h, const W* w, const float* mean, const float* rstd, const T* dh,
                        T* dx, W* dw, W* db, float* part, int64_t part_rows, int64_t N, int64_t C, bool rms,
                        cudaStream_t stream) {
  // part: part_rows x 2C floats from the caller (torch's allocator); one partial row per block.
  const int vec = pack_width<T>(C, {dy, h, dh, dx, w});
  int blocks = 0;
  NEOX_WITH_PACK(T, vec, {
    const int64_t packs = C / V;
    if (packs > kMaxPacks) {
      blocks = static_cast<int>(part_rows);
      const size_t smem = 2 * C * sizeof(float);
      auto kernel = norm_backward_kernel<T, W, V>;
      allow_dynamic_smem(kernel, smem);  // static + dynamic may pass 48 KB below 48 KB of dynamic
      kernel<<<blocks, row_threads(packs), smem, stream>>>(dy, h, w, mean, rstd, dh, dx, part, N, C, rms);
    } else {
      if constexpr (sizeof(T) * V == 16) {  // v4 takes packed rows of 129-512 packs
        if (packs > 128 && packs <= 512) {
          auto launch = packs <= 256 ? launch_backward_v4<T, W, V, 1, 3, 3, 256> : launch_backward_v4<T, W, V, 2, 2, 2, 256>;
          blocks = launch(dy, h, w, mean, rstd, dh, dx, part, part_rows, N, C, rms, stream, {});
        }
      }
      if (blocks == 0) {  // not taken by v4
        // 257-512 packs: with a residual's grad to read as well, the 512-thread prefetching variant spills
        auto launch = packs <= 256   ? launch_backward_v3<T, W, V, 1, 2, 2, true>
                      : packs <= 512 ? (dh ? launch_backward_v3<T, W, V, 2, 1, 2, false>
                                           : launch_backward_v3<T, W, V, 1, 2, 1, true, 512>)
                                     : launch_backward_v3<T, W, V, 4, 1, 1, false>;
        blocks = launch(dy, h, w, mean, rstd, dh, dx, part, part_rows, N, C, rms, stream, {});
      }
    }
  });
  const int64_t cols = db ? 2 * C : C;
  column_sum_v2_kernel<32, W><<<(cols + 31) / 32, dim3(32, 32), 0, stream>>>(part, blocks, 2 * C, cols, C, dw, db);
}

// dual_norm's backward in one kernel: dx = dh + the input grads of norm(x; w1) and norm(x; w2) (same x, mean,
// rstd) for dy1 and dy2; dwb = [dw1; dw2] rows of C, then [db1; db2] where `bias` (LayerNorm). part: part_rows x 4C.
// v4 DUAL for the packed rows v4 serves, v3 DUAL for the other sizes up to kMaxPacks whose per-thread arrays
// fit in registers; returns false, launching nothing, for the rest (rows over kMaxPacks packs, and 16-byte
// packs of 513-1024 per row: bf16/fp16 hidden 4104-8192, whose weights and four accumulators would spill),
// which the caller then runs as two norm backwards.
template <typename T, typename W>
bool norm_dual_backward_cuda(const T* dy1, const T* dy2, const T* h, const W* w1, const W* w2, const float* mean,
                             const float* rstd, const T* dh, T* dx, W* dwb, float* part, int64_t part_rows, int64_t N,
                             int64_t C, bool rms, bool bias, cudaStream_t stream) {
  const int vec = pack_width<T>(C, {dy1, dy2, h, dh, dx, w1, w2});
  int blocks = 0;
  NEOX_WITH_PACK(T, vec, {
    const int64_t packs = C / V;
    constexpr bool packed = sizeof(T) * V == 16;
    const SecondGrad<T, W> second{dy2, w2};
    // the v3 shapes: (P, R, MINB) without prefetch (the registers go to w2 and the second norm's accumulators)
    auto v3_small = launch_backward_v3<T, W, V, 1, 2, 2, false, 256, true>;  // up to 256 packs
    if (N > 0 && packs <= kMaxPacks) {
      if constexpr (packed) {
        if (packs <= 128) {
          blocks = v3_small(dy1, h, w1, mean, rstd, dh, dx, part, part_rows, N, C, rms, stream, second);
        } else if (packs <= 512) {
          auto launch = packs <= 256 ? launch_backward_v4<T, W, V, 1, 3, 2, 256, true>
                                     : launch_backward_v4<T, W, V, 1, 3, 1, 512, true>;
          blocks = launch(dy1, h, w1, mean, rstd, dh, dx, part, part_rows, N, C, rms, stream, second);
        } else if constexpr (sizeof(T) == 4) {  // 16-bit packs of 513-1024 per row would spill: two calls
          blocks = launch_backward_v3<T, W, V, 4, 1, 1, false, 256, true>(dy1, h, w1, mean, rstd, dh, dx, part,
                                                                          part_rows, N, C, rms, stream, second);
        }
      } else {
        auto launch = packs <= 256   ? v3_small
                      : packs <= 512 ? launch_backward_v3<T, W, V, 2, 1, 2, false, 256, true>
                                     : launch_backward_v3<T, W, V, 4, 1, 1, false, 256, true>;
        blocks = launch(dy1, h, w1, mean, rstd, dh, dx, part, part_rows, N, C, rms, stream, second);
      }
    }
  });
  if (blocks == 0) return false;
  const int64_t cols = (bias && !rms ? 4 : 2) * C;
  column_sum_v2_kernel<32, W><<<(cols + 31) / 32, dim3(32, 32), 0, stream>>>(part, blocks, 4 * C, cols, cols, dwb,
                                                                             static_cast<W*>(nullptr));
  return true;
}

// W: weight/bias (and their grads) as fp32, or as the activations' 16-bit type.
#define INSTANTIATE(T, W)                                                                                      \
  template void norm_forward_cuda<T, W>(const T*, const T*, const W*, const W*, T*, T*, float*, float*, int64_t, \
                                        int64_t, float, bool, cudaStream_t);                                     \
  template void norm_backward_cuda<T, W>(const T*, const T*, const W*, const float*, const float*, const T*, T*,  \
                                         W*, W*, float*, int64_t, int64_t, int64_t, bool, cudaStream_t);        \
  template void norm_dual_forward_cuda<T, W>(const T*, const W*, const W*, const W*, const W*, T*, T*, float*, float*, \
                                             int64_t, int64_t, float, bool, cudaStream_t);                       \
  template bool norm_dual_backward_cuda<T, W>(const T*, const T*, const T*, const W*, const W*, const float*,      \
                                              const float*, const T*, T*, W*, float*, int64_t, int64_t, int64_t,   \
                                              bool, bool, cudaStream_t);
INSTANTIATE(float, float)
INSTANTIATE(__nv_bfloat16, float)
INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
INSTANTIATE(__half, float)
INSTANTIATE(__half, __half)

}  // namespace neox
