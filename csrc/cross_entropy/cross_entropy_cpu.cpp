// Cross-entropy on CPU over logits in their own dtype: no fp32 copy of the logits is made.
//
// logits [N, V] (this rank's vocab shard [vocab_start, vocab_start + V)), targets [N] int64.
//   forward : per row, m = max_j x_j, s = sum_j exp(x_j - m), t = x[target - vocab_start] if the
//             target falls in this shard else 0. The caller all-reduces (m, s, t) over the vocab group
//             and forms loss_i = m + log(s) - t.
//   backward: in place, x_j <- (exp(x_j - lse_i) - [j == target]) * gscale; ignored rows get 0.
#include <algorithm>

#include "../common/cpu_common.h"

namespace neox {

template <typename T>
void cross_entropy_forward_cpu(const T* logits, const int64_t* targets, float* row_max, float* row_sum,
                               float* tgt_logit, int64_t N, int64_t V, int64_t vocab_start,
                               int64_t ignore_index) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; r++) {
    const T* xr = logits + r * V;
    float m = -INFINITY;
    for (int64_t j = 0; j < V; j++) m = std::max(m, to_float(xr[j]));
    double s = 0.0;  // fp32 accumulation over 50k terms would lose ~1e-5
    for (int64_t j = 0; j < V; j++) s += std::exp(to_float(xr[j]) - m);
    const int64_t t = targets[r] - vocab_start;
    row_max[r] = m;
    row_sum[r] = static_cast<float>(s);
    tgt_logit[r] = (targets[r] != ignore_index && t >= 0 && t < V) ? to_float(xr[t]) : 0.f;
  }
}

template <typename T>
void cross_entropy_backward_cpu(T* logits, const int64_t* targets, const float* lse, const float* gscale,
                                int64_t N, int64_t V, int64_t vocab_start, int64_t ignore_index) {
  const float g = *gscale;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; r++) {
    T* xr = logits + r * V;
    if (targets[r] == ignore_index) {
      for (int64_t j = 0; j < V; j++) xr[j] = from_float<T>(0.f);
      continue;
    }
    const float l = lse[r];
    const int64_t t = targets[r] - vocab_start;
    const bool here = t >= 0 && t < V;
    const float xt = here ? to_float(xr[t]) : 0.f;  // read before the row is overwritten
    for (int64_t j = 0; j < V; j++) xr[j] = from_float<T>(std::exp(to_float(xr[j]) - l) * g);
    if (here) xr[t] = from_float<T>((std::exp(xt - l) - 1.f) * g);
  }
}

#define INSTANTIATE(T)                                                                                  \
  template void cross_entropy_forward_cpu<T>(const T*, const int64_t*, float*, float*, float*, int64_t,  \
                                             int64_t, int64_t, int64_t);                                 \
  template void cross_entropy_backward_cpu<T>(T*, const int64_t*, const float*, const float*, int64_t,   \
                                              int64_t, int64_t, int64_t);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
