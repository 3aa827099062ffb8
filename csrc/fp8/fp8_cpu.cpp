// fp8 casts on CPU, the math of fp8.cu (torchao's tensorwise dynamic scaling, bit for bit): the CPU extension runs
// neox.kernels.fp8 in the tests, where it is compared with torchao's own cast and with the CUDA kernels.
// One partial amax (the CUDA kernel has one per block); the cast forms the scale from it as fp8.cu does.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "../common/cpu_common.h"

namespace neox {
namespace {

constexpr double kEps = 1e-12;  // torchao.float8.float8_utils.EPS

// |v| rounded to the fp8 format with MANT mantissa bits and exponent bias BIAS (round to nearest, ties to even),
// saturated at fp8_max (torchao clamps before its cast); NaN is the all-ones pattern, the sign kept as torch does.
template <int MANT, int BIAS>
uint8_t to_fp8(float v, float fp8_max) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  if (std::isnan(v)) return sign | 0x7f;
  const float a = std::min(std::fabs(v), fp8_max);
  if (a == 0.f) return sign;
  // representable values near a are multiples of q = 2^(e - MANT), e = a's binade (the subnormals share the lowest)
  const int e = std::max(std::ilogb(a), 1 - BIAS);
  const float q = std::ldexp(1.f, e - MANT);
  const float r = std::nearbyint(a / q) * q;  // a / q is exact; nearbyint rounds half to even (the default mode)
  if (r == 0.f) return sign;
  const int er = std::max(std::ilogb(r), 1 - BIAS);  // rounding may carry into the next binade
  const uint32_t sig = static_cast<uint32_t>(r / std::ldexp(1.f, er - MANT));  // integer significand, exact
  if (sig < (1u << MANT)) return sign | static_cast<uint8_t>(sig);                // subnormal
  return sign | static_cast<uint8_t>(((er + BIAS) << MANT) | (sig - (1u << MANT)));
}

}  // namespace

int fp8_amax_parts_cpu(int64_t) { return 1; }

void fp8_amax_cpu(const uint16_t* x, int64_t n, float* parts, int) {
  uint32_t m = 0;  // max of the bf16 bits with the sign cleared: |x| as bits (NaN above inf, as torch.max's NaN)
  for (int64_t i = 0; i < n; i++) m = std::max<uint32_t>(m, x[i] & 0x7fffu);
  bf16_t b{static_cast<uint16_t>(m)};
  parts[0] = to_float(b);
}

void fp8_cast_cpu(const uint16_t* x, int64_t R, int64_t C, const float* parts, int nparts, bool e5m2, uint8_t* out,
                  uint8_t* out_t, float* scale_out, float* inv_scale_out) {
  uint32_t bits = 0;
  for (int i = 0; i < nparts; i++) {
    uint32_t u;
    std::memcpy(&u, parts + i, 4);
    bits = std::max(bits, u);
  }
  float amax_f;
  std::memcpy(&amax_f, &bits, 4);
  double amax = amax_f;
  amax = amax < kEps ? kEps : amax;  // torch.clamp(amax, min=EPS); NaN stays NaN
  const float fp8_max = e5m2 ? 57344.f : 448.f;
  // as torch evaluates torchao's `fp8_max / amax` (Tensor.__rtruediv__: reciprocal, then multiply); over every
  // bf16 amax it equals the one-rounding quotient, yet this is the expression torchao runs
  const float scale = static_cast<float>((1.0 / amax) * static_cast<double>(fp8_max));
  *scale_out = scale;
  *inv_scale_out = 1.f / scale;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; r++) {
    for (int64_t c = 0; c < C; c++) {
      const float v = to_float(bf16_t{x[r * C + c]}) * scale;
      const uint8_t q = e5m2 ? to_fp8<2, 15>(v, fp8_max) : to_fp8<3, 7>(v, fp8_max);
      if (out) out[r * C + c] = q;
      if (out_t) out_t[c * R + r] = q;
    }
  }
}

}  // namespace neox
