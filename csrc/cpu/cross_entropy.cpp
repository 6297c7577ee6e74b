// Weighted per-token cross-entropy on the CPU: one forward kernel and one "directional" kernel
// that serves the backward, the forward-mode tangent, the tangent of the backward
// (forward-over-reverse) and the double backward. See datarater/kernels/cross_entropy.py for the
// maths and the plain-torch reference beside it.
//
// Every row (token) is independent, so rows are spread over threads. Inside a row the work is
// streaming: a max, a sum of exponentials, then at most one more pass that writes. Hot loops are
// compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones).
// bf16/fp16 rows are widened to float in a per-thread buffer; all accumulation is in float.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../kernels.h"
#include "vec_math.h"

namespace datarater {
namespace cpu {
namespace {

DR_CLONES float row_max(const float* z, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

DR_CLONES float row_sum_exp(const float* z, int64_t v, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) s += exp_fast(z[j] - m);
  return s;
}

// p_j = exp(z_j - lse) into p; returns sum_j p_j d_j.
DR_CLONES float row_probs_dot(const float* z, const float* d, float* p, int64_t v, float lse) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) {
    const float pj = exp_fast(z[j] - lse);
    p[j] = pj;
    s += pj * d[j];
  }
  return s;
}

DR_CLONES void row_probs(const float* z, float* p, int64_t v, float lse) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) p[j] = exp_fast(z[j] - lse);
}

// out_j = a * p_j * (d_j - pd) + b * p_j   (the target's -b is added by the caller)
DR_CLONES void row_combine(const float* p, const float* d, float* out, int64_t v, float a, float b,
                           float pd) {
  if (d == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) out[j] = b * p[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) out[j] = p[j] * (a * (d[j] - pd) + b);
  }
}

template <typename T>
inline const float* as_float_row(const T* src, float* buf, int64_t v) {
  for (int64_t j = 0; j < v; ++j) buf[j] = static_cast<float>(src[j]);
  return buf;
}
template <>
inline const float* as_float_row<float>(const float* src, float*, int64_t) {
  return src;
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t v) {
  for (int64_t j = 0; j < v; ++j) dst[j] = static_cast<T>(src[j]);
}

int64_t grain_for(int64_t v) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(v, 1)); }

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, const char* fn) {
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), fn, ": logits must be on the CPU");
  TORCH_CHECK(logits.is_contiguous(), fn, ": logits must be contiguous");
  auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), fn,
              ": targets must be [N]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(), fn,
              ": targets must be contiguous int64");
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
              what, " must be a contiguous float32 tensor with ", n, " elements");
  return t->data_ptr<float>();
}

}  // namespace

std::vector<at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                   const c10::optional<at::Tensor>& weights,
                                   int64_t ignore_index) {
  check_inputs(logits, targets, "ce_forward");
  const int64_t n = logits.size(0), v = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts), nll = at::empty({n}, opts);
  const float* w = opt_ptr(weights, n, "weights");
  const int64_t* y = targets.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  float* np = nll.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_forward", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(v), [&](int64_t b, int64_t e) {
      std::vector<float> buf(std::is_same<scalar_t, float>::value ? 0 : v);
      for (int64_t i = b; i < e; ++i) {
        const float* row = as_float_row(z + i * v, buf.data(), v);
        const float m = row_max(row, v);
        const float s = v > 0 ? m + std::log(row_sum_exp(row, v, m)) : 0.0f;
        sp[i] = s;
        if (y[i] == ignore_index || v == 0) {
          np[i] = 0.0f;
          lp[i] = 0.0f;
          continue;
        }
        TORCH_CHECK(y[i] >= 0 && y[i] < v, "ce_forward: target ", y[i], " at row ", i,
                    " is out of range for V = ", v);
        np[i] = s - row[y[i]];
        lp[i] = w ? w[i] * np[i] : np[i];
      }
    });
  });
  return {loss, lse, nll};
}

std::vector<at::Tensor> ce_directional(const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse,
                                       const c10::optional<at::Tensor>& direction,
                                       const c10::optional<at::Tensor>& coef_h,
                                       const c10::optional<at::Tensor>& coef_g,
                                       int64_t ignore_index, bool want_out,
                                       const c10::optional<at::Tensor>& out_buffer) {
  check_inputs(logits, targets, "ce_directional");
  const int64_t n = logits.size(0), v = logits.size(1);
  const float* s = opt_ptr(lse, n, "lse");
  const float* a = opt_ptr(coef_h, n, "coef_h");
  const float* bcoef = opt_ptr(coef_g, n, "coef_g");
  const bool has_d = direction.has_value() && direction->defined();
  if (has_d) {
    TORCH_CHECK(direction->sizes() == logits.sizes() && direction->is_contiguous() &&
                    direction->scalar_type() == logits.scalar_type(),
                "ce_directional: direction must be a contiguous tensor like logits");
  }
  at::Tensor dot = at::zeros({n}, logits.options().dtype(at::kFloat));
  at::Tensor out;
  if (want_out) {
    if (out_buffer.has_value() && out_buffer->defined()) {
      out = *out_buffer;  // may alias logits: every row is read fully before it is written
      TORCH_CHECK(out.sizes() == logits.sizes() && out.is_contiguous() &&
                      out.scalar_type() == logits.scalar_type(),
                  "ce_directional: out must be a contiguous tensor like logits");
    } else {
      out = at::empty_like(logits);
    }
  }
  const int64_t* y = targets.data_ptr<int64_t>();
  float* dp = dot.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_directional", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const scalar_t* d = has_d ? direction->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = want_out ? out.data_ptr<scalar_t>() : nullptr;
    constexpr bool is_f32 = std::is_same<scalar_t, float>::value;
    at::parallel_for(0, n, grain_for(v), [&](int64_t b, int64_t e) {
      std::vector<float> zbuf(is_f32 ? 0 : v), dbuf(is_f32 || !has_d ? 0 : v), p(v),
          obuf(is_f32 || !want_out ? 0 : v);
      for (int64_t i = b; i < e; ++i) {
        if (y[i] == ignore_index) {
          if (o) std::fill(o + i * v, o + (i + 1) * v, scalar_t(0));
          continue;
        }
        TORCH_CHECK(y[i] >= 0 && y[i] < v, "ce_directional: target ", y[i], " at row ", i,
                    " is out of range for V = ", v);
        const float* zr = as_float_row(z + i * v, zbuf.data(), v);
        const float* dr = has_d ? as_float_row(d + i * v, dbuf.data(), v) : nullptr;
        float pd = 0.0f;
        if (dr) {
          pd = row_probs_dot(zr, dr, p.data(), v, s[i]);
          dp[i] = pd - dr[y[i]];
        } else if (o) {
          row_probs(zr, p.data(), v, s[i]);
        }
        if (!o) continue;
        const float ai = a ? a[i] : 0.0f, bi = bcoef ? bcoef[i] : 0.0f;
        float* orow = is_f32 ? reinterpret_cast<float*>(o + i * v) : obuf.data();
        row_combine(p.data(), dr, orow, v, ai, bi, pd);
        orow[y[i]] -= bi;
        if (!is_f32) store_row(orow, o + i * v, v);
      }
    });
  });
  return {dot, want_out ? out : at::Tensor()};
}

}  // namespace cpu
}  // namespace datarater
