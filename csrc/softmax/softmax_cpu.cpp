// Scaled upper-triangular masked softmax on CPU, forward and backward, in fp32.
//
// x, y: [rows, SQ, SK] flattened to rows of SK. Query i sees keys j <= i + (SK - SQ) (causal,
// aligned bottom-right so SQ < SK works for cached keys); masked entries are written as 0.
//   forward : y = softmax(scale * x) over the visible prefix of each row
//   backward: dx = scale * y * (dy - sum(dy * y))
#include <algorithm>

#include "../common/cpu_common.h"

namespace neox {

template <typename T>
void masked_softmax_forward_cpu(const T* x, T* y, int64_t rows, int64_t SQ, int64_t SK, float scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const int64_t valid = std::min<int64_t>(SK, r % SQ + (SK - SQ) + 1);
    const T* xr = x + r * SK;
    T* yr = y + r * SK;
    float mx = -INFINITY;
    for (int64_t j = 0; j < valid; j++) mx = std::max(mx, to_float(xr[j]) * scale);
    double sum = 0.0;  // double accumulators keep long rows within fp32 rounding of the reference
    for (int64_t j = 0; j < valid; j++) sum += std::exp(to_float(xr[j]) * scale - mx);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < valid; j++) yr[j] = from_float<T>(std::exp(to_float(xr[j]) * scale - mx) * inv);
    for (int64_t j = valid; j < SK; j++) yr[j] = from_float<T>(0.f);
  }
}

template <typename T>
void masked_softmax_backward_cpu(const T* dy, const T* y, T* dx, int64_t rows, int64_t SQ, int64_t SK,
                                 float scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const int64_t valid = std::min<int64_t>(SK, r % SQ + (SK - SQ) + 1);
    const T* gr = dy + r * SK;
    const T* yr = y + r * SK;
    T* dr = dx + r * SK;
    double dot = 0.0;
    for (int64_t j = 0; j < valid; j++) dot += to_float(gr[j]) * to_float(yr[j]);
    for (int64_t j = 0; j < valid; j++) dr[j] = from_float<T>(scale * to_float(yr[j]) * (to_float(gr[j]) - static_cast<float>(dot)));
    for (int64_t j = valid; j < SK; j++) dr[j] = from_float<T>(0.f);
  }
}

#define INSTANTIATE(T)                                                                                 \
  template void masked_softmax_forward_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, float);          \
  template void masked_softmax_backward_cpu<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, float);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
