// Branch-free float maths that compilers vectorise, and the multi-versioning attribute the CPU
// kernels use (AVX-512, AVX2+FMA and baseline x86-64 clones picked at load time).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DR_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define DR_CLONES
#endif

namespace datarater {
namespace cpu {

// exp(x) to about 2 ulp, branch-free so that loops over it vectorise. exp(-inf) = 0.
inline float exp_fast(float x) {
  const float lo = -87.3365f, hi = 88.7228f;
  const bool underflow = !(x >= lo);  // also catches -inf and NaN... NaN handled below
  float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f;  // ln2 split in a high part ...
  r = r - n * 1.428606765330187e-06f;     // ... and a low part (Cody-Waite)
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float y = p * scale;
  y = underflow ? 0.0f : y;
  return x != x ? x : y;  // propagate NaN
}

// erf(x) to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), branch-free.
inline float erf_fast(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_fast(-ax * ax);
  return std::copysign(y, x);
}

}  // namespace cpu
}  // namespace datarater
