// Launchers of the CUDA cross-entropy kernels: raw pointers only, so that both the .cu file
// (plain CUDA) and the torch glue can include this header.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace datarater {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// See csrc/kernels.h (cpu::ce_forward) for the maths; all outputs are float32 [n].
cudaError_t ce_forward(DType dtype, const void* logits, const int64_t* targets,
                       const float* weights, int64_t n, int64_t v, int64_t ignore_index,
                       float* loss, float* lse, float* nll, cudaStream_t stream);

// dot [n] is written when direction != nullptr; out [n, v] (logits' dtype) when out != nullptr.
cudaError_t ce_directional(DType dtype, const void* logits, const int64_t* targets,
                           const float* lse, const void* direction, const float* coef_h,
                           const float* coef_g, int64_t n, int64_t v, int64_t ignore_index,
                           float* dot, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace datarater
