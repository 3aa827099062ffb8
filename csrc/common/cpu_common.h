// Shared helpers for the CPU kernels: storage types and float conversion.
//
// The kernels are plain C++ on raw pointers (no torch headers), so each translation unit compiles
// in about a second; csrc/bindings_cpu.cpp is the only file that includes torch.
// Storage types: float, bf16_t, half_t. All arithmetic happens in fp32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace neox {

struct bf16_t { uint16_t bits; };
struct half_t { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(half_t x) {
  // IEEE binary16 -> binary32, including subnormals, inf and nan.
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { e++; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | static_cast<uint32_t>((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};  // nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <> inline half_t from_float<half_t>(float f) {
  // binary32 -> binary16, round to nearest even, overflow to inf.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (a < 0x38800000u) {  // result is subnormal or zero
    float af;
    std::memcpy(&af, &a, 4);
    // Adding 0.5 moves the value's bits so the low mantissa holds the rounded subnormal.
    float t = af + 0.5f;
    uint32_t tu;
    std::memcpy(&tu, &t, 4);
    return half_t{static_cast<uint16_t>(sign | (tu - 0x3f000000u))};
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112<<23) and round
  return half_t{static_cast<uint16_t>(sign | (r >> 13))};
}

}  // namespace neox

// Instantiate a kernel template for the three storage types (used at the end of each *_cpu.cpp).
#define NEOX_FOR_EACH_DTYPE(M) M(float) M(neox::bf16_t) M(neox::half_t)
