// Declarations of datarater's C++ kernels (CPU always; CUDA launchers when built with CUDA).
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace datarater {
namespace cpu {

// Per-token weighted cross-entropy. Returns {loss = w * nll, lse, nll}, all float32 [N].
std::vector<at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                   const c10::optional<at::Tensor>& weights,
                                   int64_t ignore_index);

// With p = softmax(z) per row and an optional direction D (shaped like the logits):
//   dot[n] = p . D[n] - D[n, y_n]                                 (0 without D)
//   out[n] = coef_h[n] * (p * D[n] - p (p . D[n])) + coef_g[n] * (p - e_{y_n})
// out is returned only when want_out; out_buffer may be the logits themselves (in place).
// Ignored rows give dot = 0 and out = 0.
std::vector<at::Tensor> ce_directional(const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse,
                                       const c10::optional<at::Tensor>& direction,
                                       const c10::optional<at::Tensor>& coef_h,
                                       const c10::optional<at::Tensor>& coef_g,
                                       int64_t ignore_index, bool want_out,
                                       const c10::optional<at::Tensor>& out_buffer);

// Fused forward-over-reverse blocks of the transformer (float32; csrc/cpu/tangent_ops.cpp).
std::vector<at::Tensor> gelu_fwd_tangent(const at::Tensor& u, const at::Tensor& du);
std::vector<at::Tensor> gelu_bwd_tangent(const at::Tensor& ga, const at::Tensor& dga,
                                         const at::Tensor& g1, const at::Tensor& g2,
                                         const at::Tensor& du);
std::vector<at::Tensor> softmax_fwd_tangent(const at::Tensor& s, const at::Tensor& ds,
                                            double scale, bool causal);
std::vector<at::Tensor> softmax_bwd_tangent(const at::Tensor& a, const at::Tensor& da,
                                            const at::Tensor& ga, const at::Tensor& dga,
                                            double scale);
std::vector<at::Tensor> layer_norm_fwd_tangent(const at::Tensor& x, const at::Tensor& dx,
                                               const at::Tensor& gamma, const at::Tensor& dgamma,
                                               const at::Tensor& beta, const at::Tensor& dbeta,
                                               double eps);
std::vector<at::Tensor> layer_norm_bwd_tangent(const at::Tensor& gy, const at::Tensor& dgy,
                                               const at::Tensor& xh, const at::Tensor& dxh,
                                               const at::Tensor& r, const at::Tensor& m,
                                               const at::Tensor& gamma,
                                               const at::Tensor& dgamma);

}  // namespace cpu

#ifdef DATARATER_WITH_CUDA
namespace gpu {
// The same two primitives on CUDA tensors (csrc/cuda/).
std::vector<at::Tensor> ce_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                        const c10::optional<at::Tensor>& weights,
                                        int64_t ignore_index);
std::vector<at::Tensor> ce_directional_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                            const at::Tensor& lse,
                                            const c10::optional<at::Tensor>& direction,
                                            const c10::optional<at::Tensor>& coef_h,
                                            const c10::optional<at::Tensor>& coef_g,
                                            int64_t ignore_index, bool want_out,
                                            const c10::optional<at::Tensor>& out_buffer);
// Forward and gradient in one kernel (compute capability 9.0); empty when it cannot run.
std::vector<at::Tensor> ce_forward_grad_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                             const at::Tensor& coef, int64_t ignore_index,
                                             const at::Tensor& out, int64_t part_bytes,
                                             int64_t slots);
// Which fused kernel ce_forward_grad_cuda would run: (kind, slots per thread, blocks per row).
std::tuple<std::string, int64_t, int64_t> ce_forward_grad_plan_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& out,
                                                                     int64_t part_bytes,
                                                                     int64_t slots);
}  // namespace gpu
#endif

}  // namespace datarater
