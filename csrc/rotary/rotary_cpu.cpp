// Rotary position embedding on CPU (forward; the backward is the inverse rotation, sin -> -sin).
//
// x, out: [B, S, H, D] contiguous; cos, sin: [S, R/2] fp32, one entry per frequency; R = rotary dims.
//   NeoX layout      : pairs (x[i], x[i + R/2])  for i < R/2
//   interleaved (GPT-J): pairs (x[2i], x[2i + 1])
//   each pair (a, b) -> (a*cos - b*sin, b*cos + a*sin); dims >= R pass through unchanged.
//
// rotary_qkv_cpu: the same rotation in place on the attention's qkv buffer [B, S, G, P + 2, D] (G kv
// groups, each P q heads, then k, then v): only the first R dims of the P + 1 q/k heads of each group are
// read and written; v and the pass-through dims are not touched. One pointer (x is read and written).
//
// split_qkv_backward_cpu: the backward of "rotate qkv in place, then split it into q, k, v": gathers dq
// [B, S, G, P, D], dk and dv [B, S, G, D] (any strides, contiguous last dim) into the contiguous dqkv
// [B, S, G, P + 2, D] and rotates the first R dims of its q and k heads back (sin -> -sin), in one pass.
// The same values as copying them into dqkv and then running rotary_qkv_cpu(inverse) on it; R = 0 copies.
#include "../common/cpu_common.h"

namespace neox {

// The pairs of one head's first R = 2 * half dims, read from xr and written to yr (the same row in place:
// each pair is read before it is written).
template <typename T>
inline void rotate_pairs(const T* xr, T* yr, const float* cs, const float* sn, int64_t half, bool interleaved,
                         float sgn) {
  for (int64_t i = 0; i < half; i++) {
    const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const float a = to_float(xr[ia]), b = to_float(xr[ib]), c = cs[i], sv = sgn * sn[i];
    yr[ia] = from_float<T>(a * c - b * sv);
    yr[ib] = from_float<T>(b * c + a * sv);
  }
}

template <typename T>
void rotary_cpu(const T* x, const float* cos, const float* sin, T* out, int64_t B, int64_t S, int64_t H,
                int64_t D, int64_t R, bool interleaved, bool inverse) {
  const int64_t half = R / 2;
  const float sgn = inverse ? -1.f : 1.f;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bi = 0; bi < B; bi++) {
    for (int64_t s = 0; s < S; s++) {
      const float* cs = cos + s * half;
      const float* sn = sin + s * half;
      for (int64_t h = 0; h < H; h++) {
        const int64_t off = ((bi * S + s) * H + h) * D;
        const T* xr = x + off;
        T* yr = out + off;
        rotate_pairs(xr, yr, cs, sn, half, interleaved, sgn);
        for (int64_t i = R; i < D; i++) yr[i] = xr[i];
      }
    }
  }
}

template <typename T>
int rotary_qkv_cpu(T* x, const float* cos, const float* sin, int64_t B, int64_t S, int64_t G, int64_t P, int64_t D,
                   int64_t R, bool interleaved, bool inverse, int /*version: CUDA's; one kernel here*/) {
  const int64_t half = R / 2, per_token = G * (P + 2) * D;
  const float sgn = inverse ? -1.f : 1.f;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bi = 0; bi < B; bi++) {
    for (int64_t s = 0; s < S; s++) {
      const float* cs = cos + s * half;
      const float* sn = sin + s * half;
      T* token = x + (bi * S + s) * per_token;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t h = 0; h <= P; h++) {  // the q heads and k, not v
          T* xr = token + (g * (P + 2) + h) * D;
          rotate_pairs(xr, xr, cs, sn, half, interleaved, sgn);
        }
      }
    }
  }
  return 0;
}

template <typename T>
int split_qkv_backward_cpu(const T* dq, const T* dk, const T* dv, const int64_t* strides, T* dqkv, const float* cos,
                           const float* sin, int64_t B, int64_t S, int64_t G, int64_t P, int64_t D, int64_t R,
                           bool interleaved, int /*version: CUDA's; one kernel here*/) {
  const int64_t half = R / 2, *sq = strides, *sk = strides + 4, *sv = strides + 7;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t bi = 0; bi < B; bi++) {
    for (int64_t s = 0; s < S; s++) {
      T* token = dqkv + (bi * S + s) * G * (P + 2) * D;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t h = 0; h < P + 2; h++) {
          const T* src = h < P    ? dq + bi * sq[0] + s * sq[1] + g * sq[2] + h * sq[3]
                         : h == P ? dk + bi * sk[0] + s * sk[1] + g * sk[2]
                                  : dv + bi * sv[0] + s * sv[1] + g * sv[2];
          T* dst = token + (g * (P + 2) + h) * D;
          const int64_t rotated = h <= P ? R : 0;  // v is copied whole
          if (rotated) rotate_pairs(src, dst, cos + s * half, sin + s * half, half, interleaved, -1.f);
          std::memcpy(dst + rotated, src + rotated, (D - rotated) * sizeof(T));
        }
      }
    }
  }
  return 0;
}

#define INSTANTIATE(T)                                                                            \
  template int rotary_qkv_cpu<T>(T*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                 int64_t, bool, bool, int);                                       \
  template void rotary_cpu<T>(const T*, const float*, const float*, T*, int64_t, int64_t, int64_t, \
                              int64_t, int64_t, bool, bool);                                      \
  template int split_qkv_backward_cpu<T>(const T*, const T*, const T*, const int64_t*, T*, const float*, \
                                         const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
