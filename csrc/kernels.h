// Declarations of datarater's C++ kernels (CPU always; CUDA launchers when built with CUDA).
#pragma once

#include <torch/extension.h>

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
}  // namespace gpu
#endif

}  // namespace datarater
