// AdamW from bf16 gradients on CPU: the fp32 master, exp_avg, exp_avg_sq updated in place, the bf16 weight
// written from the new master, one pass per tensor (OpenMP over elements).
//
// The arithmetic follows torch's CPU fused AdamW for fp32 params (aten/src/ATen/native/cpu/FusedAdamKernel.cpp,
// adam_fused_step_impl + the vectorised fp32 adam_math, ADAMW mode), which differs from torch's CUDA kernel:
//   - bias corrections and step_size in double from the fp32 step count, then rounded to fp32;
//   - g = grad / grad_scale; weight decay as p = p * float(1 - lr * wd);
//   - exp_avg as torch's lerp: w = float(1 - beta1); |w| < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g);
//   - v = fma((1 - beta2) * g, g, v * beta2): torch's source says v * beta2 + ((1 - beta2) * g) * g, and its
//     x86 build contracts that into this fma (all 100,000 elements of a probe matched it, none the unfused form);
//   - p = p + (-step_size * m) / (sqrt(v) / bc2_sqrt + eps).
// torch's vectorised loop is reproduced operation for operation; its scalar tail and the compiler's choices
// may differ in the last bit (tests/kernels/test_adamw.py bounds the gap).
#include <cmath>

#include "../common/cpu_common.h"
#include "../common/ops.h"

namespace neox {

namespace {

struct Consts {
  float decay, lerp_w, lerp_coeff, beta2, sq_coeff, bc2_sqrt, eps, neg_step_size;
  bool lerp_small, has_decay;
};

Consts consts_for(const AdamwHyper& h, float step_count) {
  const double step = step_count;
  const double bc1 = 1 - std::pow(h.beta1, step);
  const double bc2 = 1 - std::pow(h.beta2, step);
  const double step_size = h.lr / bc1;
  Consts c;
  c.decay = static_cast<float>(1 - h.lr * h.weight_decay);
  c.has_decay = h.weight_decay != 0.f;
  c.lerp_w = static_cast<float>(1 - h.beta1);
  c.lerp_small = std::abs(c.lerp_w) < 0.5f;
  c.lerp_coeff = c.lerp_small ? c.lerp_w : c.lerp_w - 1.f;
  c.beta2 = static_cast<float>(h.beta2);
  c.sq_coeff = static_cast<float>(1 - h.beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.eps = static_cast<float>(h.eps);
  c.neg_step_size = static_cast<float>(-step_size);
  return c;
}

void step_tensor(const AdamwSpan& s, const Consts& c, const float* grad_scale) {
  const bf16_t* g16 = reinterpret_cast<const bf16_t*>(s.g16);
  bf16_t* w16 = reinterpret_cast<bf16_t*>(s.w16);
  const bool scaled = grad_scale != nullptr;
  const float scale = scaled ? *grad_scale : 1.f;
#pragma omp parallel for schedule(static) if (s.n > (1 << 16))
  for (int64_t i = 0; i < s.n; i++) {
    float g = g16 ? to_float(g16[i]) : 0.f;
    if (scaled) g = g / scale;
    float p = s.master[i];
    if (c.has_decay) p = p * c.decay;
    float m = s.exp_avg[i];
    m = std::fma(c.lerp_coeff, g - m, c.lerp_small ? m : g);
    float v = s.exp_avg_sq[i];
    v = std::fma(c.sq_coeff * g, g, v * c.beta2);  // as torch's build contracts its v * beta2 + (c2 * g) * g
    const float denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
    const float u = c.neg_step_size * m;
    p = p + u / denom;
    s.master[i] = p;
    s.exp_avg[i] = m;
    s.exp_avg_sq[i] = v;
    w16[i] = from_float<bf16_t>(p);
  }
}

}  // namespace

void adamw_bf16_step_cpu(const AdamwSpan* spans, int64_t count, AdamwHyper h, const float* grad_scale,
                         const float* found_inf) {
  if (found_inf && *found_inf != 0.f) return;  // a skipped step changes nothing
  for (int64_t i = 0; i < count; i++)
    if (spans[i].n > 0) step_tensor(spans[i], consts_for(h, *spans[i].step), grad_scale);
}

}  // namespace neox
