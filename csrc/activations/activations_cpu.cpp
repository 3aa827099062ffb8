// Bias + GeLU and SwiGLU on CPU, forward and backward, in fp32.
//
// bias_gelu: x [N, C], bias [C] fp32;  y = gelu(x + bias), erf form or tanh approximation.
//            backward: dx = g * gelu'(x + bias); dbias = sum_rows(dx) (fp32 accumulation).
// swiglu   : x [N, 2F] holding (gate, up) pairs;  y [N, F] = silu(gate) * up.
//            backward: dgate = g * up * s * (1 + gate * (1 - s)), dup = g * silu(gate), s = sigmoid(gate).
#include <omp.h>

#include <vector>

#include "../common/cpu_common.h"

namespace neox {

static constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
static constexpr float kBeta = 0.044715f;
static constexpr float kInvSqrt2 = 0.7071067811865476f;
static constexpr float kInvSqrt2Pi = 0.3989422804014327f;

static inline float gelu(float v, bool tanh_approx) {
  if (tanh_approx) return 0.5f * v * (1.f + std::tanh(kAlpha * (v + kBeta * v * v * v)));
  return 0.5f * v * (1.f + std::erf(v * kInvSqrt2));
}

static inline float gelu_grad(float v, bool tanh_approx) {
  if (tanh_approx) {
    float t = std::tanh(kAlpha * (v + kBeta * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kAlpha * (1.f + 3.f * kBeta * v * v);
  }
  return 0.5f * (1.f + std::erf(v * kInvSqrt2)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
}

// W (bias/dbias) is float here: the CPU bindings cast 16-bit biases (NEOX_NATIVE_PARAMS = 0).
template <typename T, typename W>
void bias_gelu_forward_cpu(const T* x, const W* bias, T* y, int64_t N, int64_t C, bool tanh_approx) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; r++)
    for (int64_t c = 0; c < C; c++) y[r * C + c] = from_float<T>(gelu(to_float(x[r * C + c]) + bias[c], tanh_approx));
}

template <typename T, typename W>
void bias_gelu_backward_cpu(const T* dy, const T* x, const W* bias, T* dx, W* dbias, float* /*part*/,
                            int64_t /*part_rows*/, int64_t N, int64_t C, bool tanh_approx) {
  int nt = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(nt) * C, 0.f);
#pragma omp parallel num_threads(nt)
  {
    float* p = part.data() + static_cast<size_t>(omp_get_thread_num()) * C;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++) {
      for (int64_t c = 0; c < C; c++) {
        float g = to_float(dy[r * C + c]) * gelu_grad(to_float(x[r * C + c]) + bias[c], tanh_approx);
        T gt = from_float<T>(g);
        dx[r * C + c] = gt;
        p[c] += to_float(gt);  // dbias sums the stored dx, as autograd of (x + bias) would
      }
    }
  }
  for (int64_t c = 0; c < C; c++) {
    float s = 0.f;
    for (int t = 0; t < nt; t++) s += part[static_cast<size_t>(t) * C + c];
    dbias[c] = s;
  }
}

// Column sums of dy [N, C] (a linear layer's bias gradient), fp32: per-thread partial rows, then added in
// thread order.
template <typename T>
void bias_grad_cpu(const T* dy, float* dbias, float* /*part*/, int64_t /*part_rows*/, int64_t N, int64_t C) {
  int nt = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(nt) * C, 0.f);
#pragma omp parallel num_threads(nt)
  {
    float* p = part.data() + static_cast<size_t>(omp_get_thread_num()) * C;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++)
      for (int64_t c = 0; c < C; c++) p[c] += to_float(dy[r * C + c]);
  }
  for (int64_t c = 0; c < C; c++) {
    float s = 0.f;
    for (int t = 0; t < nt; t++) s += part[static_cast<size_t>(t) * C + c];
    dbias[c] = s;
  }
}

template <typename T>
void swiglu_forward_cpu(const T* x, T* y, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N * F; i++) {
    float gate = to_float(x[2 * i]), up = to_float(x[2 * i + 1]);
    y[i] = from_float<T>(gate / (1.f + std::exp(-gate)) * up);
  }
}

template <typename T>
void swiglu_backward_cpu(const T* dy, const T* x, T* dx, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N * F; i++) {
    float gate = to_float(x[2 * i]), up = to_float(x[2 * i + 1]), g = to_float(dy[i]);
    float s = 1.f / (1.f + std::exp(-gate));
    dx[2 * i] = from_float<T>(g * up * s * (1.f + gate * (1.f - s)));
    dx[2 * i + 1] = from_float<T>(g * gate * s);
  }
}

#define INSTANTIATE(T)                                                                                \
  template void bias_gelu_forward_cpu<T, float>(const T*, const float*, T*, int64_t, int64_t, bool);   \
  template void bias_gelu_backward_cpu<T, float>(const T*, const T*, const float*, T*, float*, float*, int64_t, \
                                          int64_t, int64_t, bool);                                                       \
  template void swiglu_forward_cpu<T>(const T*, T*, int64_t, int64_t);                                 \
  template void swiglu_backward_cpu<T>(const T*, const T*, T*, int64_t, int64_t);                     \
  template void bias_grad_cpu<T>(const T*, float*, float*, int64_t, int64_t, int64_t);
NEOX_FOR_EACH_DTYPE(INSTANTIATE)

}  // namespace neox
