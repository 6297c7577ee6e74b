// Launchers of the CUDA cross-entropy kernels: raw pointers only, so that both the .cu file
// (plain CUDA) and the torch glue can include this header.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace datarater {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Which fused kernel a ce_forward_grad call runs: kind 0 none (the caller's two kernels),
// 1 the row in shared memory, 2 the row in registers (slots per thread); blocks per row.
struct FusedPlan {
  int kind = 0;
  int64_t slots = 0;
  int64_t blocks = 0;
};

// See csrc/kernels.h (cpu::ce_forward) for the maths; all outputs are float32 [n].
cudaError_t ce_forward(DType dtype, const void* logits, const int64_t* targets,
                       const float* weights, int64_t n, int64_t v, int64_t ignore_index,
                       float* loss, float* lse, float* nll, cudaStream_t stream);

// dot [n] is written when direction != nullptr; out [n, v] (logits' dtype) when out != nullptr.
cudaError_t ce_directional(DType dtype, const void* logits, const int64_t* targets,
                           const float* lse, const void* direction, const float* coef_h,
                           const float* coef_g, int64_t n, int64_t v, int64_t ignore_index,
                           float* dot, void* out, cudaStream_t stream);

// Forward with weights coef and the gradient coef * (p - e_y) into grad [n, v] (may alias the
// logits), in one read of the logits and one write: each row is split over a cluster of thread
// blocks that hold it in shared memory (slots == 0: at most part_bytes per block, 8 blocks) or in
// registers (slots = 16 or 32 logits per thread, up to 16 blocks).
// cudaErrorNotSupported: no compute capability 9.0, or a row too long for that layout (the
// caller then runs ce_forward and ce_directional).
cudaError_t ce_forward_grad(DType dtype, const void* logits, const int64_t* targets,
                            const float* coef, int64_t n, int64_t v, int64_t ignore_index,
                            float* loss, float* lse, float* nll, void* grad, int64_t part_bytes,
                            int64_t slots, cudaStream_t stream);

// What ce_forward_grad would run for these arguments on the current device, without running
// it (benchmarks and tests report it: a fallback is otherwise silent).
cudaError_t ce_forward_grad_plan(DType dtype, const void* logits, const void* grad, int64_t n,
                                 int64_t v, int64_t part_bytes, int64_t slots, FusedPlan* plan);

}  // namespace cuda
}  // namespace datarater
