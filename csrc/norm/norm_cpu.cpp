// LayerNorm and RMSNorm on CPU, forward and backward, with an optional fused residual add.
//
// Layout: rows of C contiguous elements; statistics and the affine transform in fp32.
//   forward : h = x (+ residual, rounded to T);  y = (h - mean) * rstd * w + b      (LayerNorm)
//                                                y = h * rstd * w                    (RMSNorm)
//   backward: dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat))   (RMSNorm: no mean(g*w) term)
//             dw = sum_rows(g * xhat), db = sum_rows(g);  dx += dh (grad of the returned residual sum)
// Rows are split across OpenMP threads; dw/db are reduced from per-thread partial rows.
#include <omp.h>

#include <vector>

#include "../common/cpu_common.h"

namespace neox {

// W (the weight/bias type) is fp32 on CPU: the bindings cast 16-bit parameters first.
template <typename T, typename W>
void norm_forward_cpu(const T* x, const T* residual, const W* w, const W* b, T* y, T* h_out,
                      float* mean_out, float* rstd_out, int64_t N, int64_t C, float eps, bool rms) {
#pragma omp parallel
  {
    std::vector<float> h(C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++) {
      const T* xr = x + r * C;
      if (residual) {
        const T* rr = residual + r * C;
        T* hr = h_out + r * C;
        for (int64_t c = 0; c < C; c++) {
          T v = from_float<T>(to_float(xr[c]) + to_float(rr[c]));  // h is stored in T: use the rounded value
          hr[c] = v;
          h[c] = to_float(v);
        }
      } else {
        for (int64_t c = 0; c < C; c++) h[c] = to_float(xr[c]);
      }
      float mean = 0.f;
      if (!rms) {
        double s = 0.0;
        for (int64_t c = 0; c < C; c++) s += h[c];
        mean = static_cast<float>(s / C);
      }
      double ss = 0.0;  // two-pass variance: no cancellation for large means
      for (int64_t c = 0; c < C; c++) {
        float d = h[c] - mean;
        ss += d * d;
      }
      float rstd = 1.f / std::sqrt(static_cast<float>(ss / C) + eps);
      T* yr = y + r * C;
      for (int64_t c = 0; c < C; c++) {
        float v = (h[c] - mean) * rstd * w[c];
        if (b) v += b[c];
        yr[c] = from_float<T>(v);
      }
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  }
}

template <typename T, typename W>
void norm_backward_cpu(const T* dy, const T* h, const W* w, const float* mean, const float* rstd,
                       const T* dh, T* dx, W* dw, W* db, float* /*part*/, int64_t /*part_rows*/, int64_t N,
                       int64_t C, bool rms) {
  int nt = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(nt) * 2 * C, 0.f);  // per-thread [dw | db] partials
#pragma omp parallel num_threads(nt)
  {
    float* pdw = part.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    float* pdb = pdw + C;
    std::vector<float> gw(C), xh(C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++) {
      const T* gr = dy + r * C;
      const T* hr = h + r * C;
      float m = mean[r], s = rstd[r];
      double sum_gw = 0.0, sum_gwx = 0.0;
      for (int64_t c = 0; c < C; c++) {
        float g = to_float(gr[c]);
        xh[c] = (to_float(hr[c]) - m) * s;
        gw[c] = g * w[c];
        sum_gw += gw[c];
        sum_gwx += gw[c] * xh[c];
        pdw[c] += g * xh[c];
        pdb[c] += g;
      }
      float a = rms ? 0.f : static_cast<float>(sum_gw / C), bb = static_cast<float>(sum_gwx / C);
      T* dxr = dx + r * C;
      for (int64_t c = 0; c < C; c++) {
        float v = s * (gw[c] - a - xh[c] * bb);
        if (dh) v += to_float(dh[r * C + c]);
        dxr[c] = from_float<T>(v);
      }
    }
  }
  for (int64_t c = 0; c < C; c++) {
    float sw = 0.f, sb = 0.f;
    for (int t = 0; t < nt; t++) {
      sw += part[static_cast<size_t>(t) * 2 * C + c];
      sb += part[static_cast<size_t>(t) * 2 * C + C + c];
    }
    dw[c] = sw;
    if (db) db[c] = sb;
  }
}

// dual_norm's forward: both norms of x. On CPU simply two forwards (the second rewrites the same statistics).
template <typename T, typename W>
void norm_dual_forward_cpu(const T* x, const W* w1, const W* b1, const W* w2, const W* b2, T* y1, T* y2, float* mean,
                           float* rstd, int64_t N, int64_t C, float eps, bool rms) {
  norm_forward_cpu<T, W>(x, nullptr, w1, b1, y1, nullptr, mean, rstd, N, C, eps, rms);
  norm_forward_cpu<T, W>(x, nullptr, w2, b2, y2, nullptr, mean, rstd, N, C, eps, rms);
}

#define INSTANTIATE(T)                                                                              \
  template void norm_dual_forward_cpu<T, float>(const T*, const float*, const float*, const float*,     \
                                                const float*, T*, T*, float*, float*, int64_t, int64_t, float, bool); \
  template void norm_forward_cpu<T, float>(const T*, const T*, const float*, const float*, T*, T*, float*, \
                                    float*, int64_t, int64_t, float, bool);                         \
  template void norm_backward_cpu<T, float>(const T*, const T*, const float*, const float*, const float*,  \
                                     const T*, T*, float*, float*, float*, int64_t, int64_t, int64_t, bool);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
