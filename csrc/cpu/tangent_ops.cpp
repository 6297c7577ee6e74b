// Fused forward-over-reverse building blocks of the transformer on the CPU (float32).
//
// The hand-written pass of datarater/models/forward_over_reverse.py needs, for GELU and for the
// attention softmax, the primal value, its tangent, the backward and the backward's tangent.
// Written as separate torch ops each is a handful of memory-bound passes; here each is one pass
// (row-local for the softmax). The plain-torch versions beside them in
// datarater/kernels/tangent_ops.py are the reference and the fallback.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../kernels.h"
#include "vec_math.h"

namespace datarater {
namespace cpu {
namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

void check_f32(const at::Tensor& t, const char* fn, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), fn,
              ": ", what, " must be a contiguous float32 CPU tensor");
}

DR_CLONES void gelu_fwd_range(const float* u, const float* du, float* act, float* dact, float* g1,
                              float* g2, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = u[i];
    const float cdf = 0.5f * (1.0f + erf_fast(x * kInvSqrt2));
    const float pdf = exp_fast(-0.5f * x * x) * kInvSqrt2Pi;
    const float d1 = cdf + x * pdf;
    act[i] = x * cdf;
    g1[i] = d1;
    g2[i] = pdf * (2.0f - x * x);
    dact[i] = d1 * du[i];
  }
}

DR_CLONES void gelu_bwd_range(const float* ga, const float* dga, const float* g1, const float* g2,
                              const float* du, float* gu, float* dgu, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    gu[i] = ga[i] * g1[i];
    dgu[i] = dga[i] * g1[i] + ga[i] * g2[i] * du[i];
  }
}

}  // namespace

std::vector<at::Tensor> gelu_fwd_tangent(const at::Tensor& u, const at::Tensor& du) {
  check_f32(u, "gelu_fwd_tangent", "u");
  check_f32(du, "gelu_fwd_tangent", "du");
  TORCH_CHECK(u.sizes() == du.sizes(), "gelu_fwd_tangent: u and du differ in shape");
  auto act = at::empty_like(u), dact = at::empty_like(u), g1 = at::empty_like(u),
       g2 = at::empty_like(u);
  const float *pu = u.data_ptr<float>(), *pdu = du.data_ptr<float>();
  float *pa = act.data_ptr<float>(), *pda = dact.data_ptr<float>(), *p1 = g1.data_ptr<float>(),
        *p2 = g2.data_ptr<float>();
  at::parallel_for(0, u.numel(), 16384, [&](int64_t b, int64_t e) {
    gelu_fwd_range(pu + b, pdu + b, pa + b, pda + b, p1 + b, p2 + b, e - b);
  });
  return {act, dact, g1, g2};
}

std::vector<at::Tensor> gelu_bwd_tangent(const at::Tensor& ga, const at::Tensor& dga,
                                         const at::Tensor& g1, const at::Tensor& g2,
                                         const at::Tensor& du) {
  for (const auto* t : {&ga, &dga, &g1, &g2, &du}) {
    check_f32(*t, "gelu_bwd_tangent", "every input");
    TORCH_CHECK(t->sizes() == ga.sizes(), "gelu_bwd_tangent: inputs differ in shape");
  }
  auto gu = at::empty_like(ga), dgu = at::empty_like(ga);
  const float *a = ga.data_ptr<float>(), *da = dga.data_ptr<float>(), *p1 = g1.data_ptr<float>(),
              *p2 = g2.data_ptr<float>(), *pdu = du.data_ptr<float>();
  float *o = gu.data_ptr<float>(), *od = dgu.data_ptr<float>();
  at::parallel_for(0, ga.numel(), 16384, [&](int64_t b, int64_t e) {
    gelu_bwd_range(a + b, da + b, p1 + b, p2 + b, pdu + b, o + b, od + b, e - b);
  });
  return {gu, dgu};
}

// Rows of length L of [..., Lq, L] score matrices (square when causal: row r of a matrix is then
// query position r % L).
// a = softmax(scale * s) over keys j <= r (causal) or all j; da = a (scale ds - a . scale ds).
std::vector<at::Tensor> softmax_fwd_tangent(const at::Tensor& s, const at::Tensor& ds,
                                            double scale, bool causal) {
  check_f32(s, "softmax_fwd_tangent", "s");
  check_f32(ds, "softmax_fwd_tangent", "ds");
  TORCH_CHECK(s.sizes() == ds.sizes() && s.dim() >= 2 && (!causal || s.size(-1) == s.size(-2)),
              "softmax_fwd_tangent: s and ds must be [..., Lq, Lk] of one shape, square if causal");
  const int64_t l = s.size(-1), rows = s.numel() / std::max<int64_t>(l, 1);
  auto a = at::empty_like(s), da = at::empty_like(s);
  const float *ps = s.data_ptr<float>(), *pds = ds.data_ptr<float>();
  float *pa = a.data_ptr<float>(), *pda = da.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(l, 1)),
                   [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* x = ps + r * l;
      const float* dx = pds + r * l;
      float* y = pa + r * l;
      float* dy = pda + r * l;
      const int64_t n = causal ? (r % l) + 1 : l;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        y[j] = exp_fast(sc * (x[j] - m));
        sum += y[j];
      }
      const float inv = 1.0f / sum;
      float adx = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        y[j] *= inv;
        adx += y[j] * dx[j];
      }
      for (int64_t j = 0; j < n; ++j) dy[j] = sc * y[j] * (dx[j] - adx);
      for (int64_t j = n; j < l; ++j) y[j] = dy[j] = 0.0f;
    }
  });
  return {a, da};
}

// Backward of the above with its tangent, the scale folded in (so gq = gs k scale-free):
// gs = scale a (ga - a . ga); dgs = scale (da (ga - rho) + a (dga - drho)).
std::vector<at::Tensor> softmax_bwd_tangent(const at::Tensor& a, const at::Tensor& da,
                                            const at::Tensor& ga, const at::Tensor& dga,
                                            double scale) {
  for (const auto* t : {&a, &da, &ga, &dga}) {
    check_f32(*t, "softmax_bwd_tangent", "every input");
    TORCH_CHECK(t->sizes() == a.sizes(), "softmax_bwd_tangent: inputs differ in shape");
  }
  const int64_t l = a.size(-1), rows = a.numel() / std::max<int64_t>(l, 1);
  auto gs = at::empty_like(a), dgs = at::empty_like(a);
  const float *pa = a.data_ptr<float>(), *pda = da.data_ptr<float>(), *pg = ga.data_ptr<float>(),
              *pdg = dga.data_ptr<float>();
  float *o = gs.data_ptr<float>(), *od = dgs.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(l, 1)),
                   [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t off = r * l;
      float rho = 0.0f, drho = 0.0f;
#pragma omp simd reduction(+ : rho, drho)
      for (int64_t j = 0; j < l; ++j) {
        rho += pa[off + j] * pg[off + j];
        drho += pda[off + j] * pg[off + j] + pa[off + j] * pdg[off + j];
      }
#pragma omp simd
      for (int64_t j = 0; j < l; ++j) {
        const float gmr = pg[off + j] - rho;
        o[off + j] = sc * pa[off + j] * gmr;
        od[off + j] = sc * (pda[off + j] * gmr + pa[off + j] * (pdg[off + j] - drho));
      }
    }
  });
  return {gs, dgs};
}

// LayerNorm over rows of width D with its tangent. Returns y, dy and what the backward needs:
// xh, dxh [rows, D] and r = 1/sigma, m = mean(xh dx) [rows].
std::vector<at::Tensor> layer_norm_fwd_tangent(const at::Tensor& x, const at::Tensor& dx,
                                               const at::Tensor& gamma, const at::Tensor& dgamma,
                                               const at::Tensor& beta, const at::Tensor& dbeta,
                                               double eps) {
  for (const auto* t : {&x, &dx, &gamma, &dgamma, &beta, &dbeta}) {
    check_f32(*t, "layer_norm_fwd_tangent", "every input");
  }
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(dx.sizes() == x.sizes() && gamma.numel() == d && dgamma.numel() == d &&
                  beta.numel() == d && dbeta.numel() == d,
              "layer_norm_fwd_tangent: shapes do not match");
  auto y = at::empty_like(x), dy = at::empty_like(x), xh = at::empty_like(x),
       dxh = at::empty_like(x);
  auto r = at::empty({rows}, x.options()), m = at::empty({rows}, x.options());
  const float *px = x.data_ptr<float>(), *pdx = dx.data_ptr<float>(), *g = gamma.data_ptr<float>(),
              *dg = dgamma.data_ptr<float>(), *bt = beta.data_ptr<float>(),
              *dbt = dbeta.data_ptr<float>();
  float *py = y.data_ptr<float>(), *pdy = dy.data_ptr<float>(), *pxh = xh.data_ptr<float>(),
        *pdxh = dxh.data_ptr<float>(), *pr = r.data_ptr<float>(), *pm = m.data_ptr<float>();
  const float inv_d = 1.0f / static_cast<float>(d);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)),
                   [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const float* xi = px + i * d;
      const float* dxi = pdx + i * d;
      float mu = 0.0f, mdx = 0.0f;
#pragma omp simd reduction(+ : mu, mdx)
      for (int64_t j = 0; j < d; ++j) {
        mu += xi[j];
        mdx += dxi[j];
      }
      mu *= inv_d;
      mdx *= inv_d;
      float var = 0.0f;
#pragma omp simd reduction(+ : var)
      for (int64_t j = 0; j < d; ++j) var += (xi[j] - mu) * (xi[j] - mu);
      const float ri = 1.0f / std::sqrt(var * inv_d + e);
      float mxdx = 0.0f;
#pragma omp simd reduction(+ : mxdx)
      for (int64_t j = 0; j < d; ++j) mxdx += (xi[j] - mu) * ri * dxi[j];
      mxdx *= inv_d;
      float* xhi = pxh + i * d;
      float* dxhi = pdxh + i * d;
      float* yi = py + i * d;
      float* dyi = pdy + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float h = (xi[j] - mu) * ri;
        const float dh = ri * (dxi[j] - mdx - h * mxdx);
        xhi[j] = h;
        dxhi[j] = dh;
        yi[j] = h * g[j] + bt[j];
        dyi[j] = dh * g[j] + h * dg[j] + dbt[j];
      }
      pr[i] = ri;
      pm[i] = mxdx;
    }
  });
  return {y, dy, xh, dxh, r, m};
}

// Backward of the above with its tangent: gx, dgx [rows, D], and the tangents of the parameter
// gradients, sum_rows(dgy xh + gy dxh) and sum_rows(dgy) [D].
std::vector<at::Tensor> layer_norm_bwd_tangent(const at::Tensor& gy, const at::Tensor& dgy,
                                               const at::Tensor& xh, const at::Tensor& dxh,
                                               const at::Tensor& r, const at::Tensor& m,
                                               const at::Tensor& gamma,
                                               const at::Tensor& dgamma) {
  for (const auto* t : {&gy, &dgy, &xh, &dxh, &r, &m, &gamma, &dgamma}) {
    check_f32(*t, "layer_norm_bwd_tangent", "every input");
  }
  const int64_t d = xh.size(-1), rows = xh.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(gy.sizes() == xh.sizes() && dgy.sizes() == xh.sizes() && dxh.sizes() == xh.sizes() &&
                  r.numel() == rows && m.numel() == rows && gamma.numel() == d &&
                  dgamma.numel() == d,
              "layer_norm_bwd_tangent: shapes do not match");
  auto gx = at::empty_like(xh), dgx = at::empty_like(xh);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads() * 4));
  auto partial = at::zeros({chunks, 2, d}, xh.options());
  const float *pg = gy.data_ptr<float>(), *pdg = dgy.data_ptr<float>(), *pxh = xh.data_ptr<float>(),
              *pdxh = dxh.data_ptr<float>(), *pr = r.data_ptr<float>(), *pm = m.data_ptr<float>(),
              *ga = gamma.data_ptr<float>(), *dga = dgamma.data_ptr<float>();
  float *o = gx.data_ptr<float>(), *od = dgx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const float inv_d = 1.0f / static_cast<float>(d);
  const int64_t per = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* acc_w = pp + c * 2 * d;
      float* acc_b = acc_w + d;
      for (int64_t i = c * per; i < std::min(rows, (c + 1) * per); ++i) {
        const int64_t off = i * d;
        float ma = 0.0f, maxh = 0.0f, mda = 0.0f, mdaxh = 0.0f, madxh = 0.0f;
#pragma omp simd reduction(+ : ma, maxh, mda, mdaxh, madxh)
        for (int64_t j = 0; j < d; ++j) {
          const float a = pg[off + j] * ga[j];
          const float da = pdg[off + j] * ga[j] + pg[off + j] * dga[j];
          ma += a;
          maxh += a * pxh[off + j];
          mda += da;
          mdaxh += da * pxh[off + j];
          madxh += a * pdxh[off + j];
        }
        ma *= inv_d;
        maxh *= inv_d;
        mda *= inv_d;
        mdaxh *= inv_d;
        madxh *= inv_d;
        const float ri = pr[i], rm = pr[i] * pm[i];
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const float h = pxh[off + j], dh = pdxh[off + j];
          const float a = pg[off + j] * ga[j];
          const float da = pdg[off + j] * ga[j] + pg[off + j] * dga[j];
          const float inner = a - ma - h * maxh;
          const float d_inner = da - mda - dh * maxh - h * (mdaxh + madxh);
          o[off + j] = ri * inner;
          od[off + j] = ri * (d_inner - rm * inner);
          acc_w[j] += pdg[off + j] * h + pg[off + j] * dh;
          acc_b[j] += pdg[off + j];
        }
      }
    }
  });
  auto sums = partial.sum(0);
  return {gx, dgx, sums[0], sums[1]};
}

}  // namespace cpu
}  // namespace datarater
