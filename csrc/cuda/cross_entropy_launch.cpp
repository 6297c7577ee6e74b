// Torch glue for the CUDA cross-entropy kernels (compiled only when torch has CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "../kernels.h"
#include "cross_entropy_cuda.h"

namespace datarater {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "cuda cross-entropy: logits must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

void check(const at::Tensor& logits, const at::Tensor& targets, const char* fn) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), fn,
              ": logits must be a contiguous CUDA tensor [N, V]");
  TORCH_CHECK(targets.is_cuda() && targets.scalar_type() == at::kLong &&
                  targets.numel() == logits.size(0) && targets.is_contiguous(),
              fn, ": targets must be a contiguous int64 CUDA tensor [N]");
  TORCH_CHECK(logits.size(0) <= INT32_MAX, fn, ": at most 2^31 - 1 rows per call (a block "
              "per row), got ", logits.size(0), ": split the rows");
}

// The fused kernel's own arguments, alike for the launch and its plan.
void check_fused(const at::Tensor& logits, const at::Tensor& out, int64_t part_bytes,
                 int64_t slots, const char* fn) {
  TORCH_CHECK(out.sizes() == logits.sizes() && out.is_contiguous() &&
                  out.scalar_type() == logits.scalar_type() && out.device() == logits.device(),
              fn, ": out must be a contiguous tensor like logits");
  TORCH_CHECK(part_bytes >= 1024, fn, ": part_bytes must be at least 1024, got ", part_bytes);
  TORCH_CHECK(slots == 0 || slots == 16 || slots == 32, fn,
              ": slots must be 0 (shared memory), 16 or 32, got ", slots);
}

const float* opt_f32(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->numel() == n,
              what, " must be a contiguous float32 CUDA tensor with ", n, " elements");
  return t->data_ptr<float>();
}

}  // namespace
}  // namespace cuda

namespace gpu {

std::vector<at::Tensor> ce_forward_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                        const c10::optional<at::Tensor>& weights,
                                        int64_t ignore_index) {
  cuda::check(logits, targets, "ce_forward_cuda");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), v = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts), nll = at::empty({n}, opts);
  auto err = cuda::ce_forward(cuda::dtype_of(logits), logits.data_ptr(),
                              targets.data_ptr<int64_t>(), cuda::opt_f32(weights, n, "weights"),
                              n, v, ignore_index, loss.data_ptr<float>(), lse.data_ptr<float>(),
                              nll.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ce_forward_cuda: ", cudaGetErrorString(err));
  return {loss, lse, nll};
}

std::vector<at::Tensor> ce_directional_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                            const at::Tensor& lse,
                                            const c10::optional<at::Tensor>& direction,
                                            const c10::optional<at::Tensor>& coef_h,
                                            const c10::optional<at::Tensor>& coef_g,
                                            int64_t ignore_index, bool want_out,
                                            const c10::optional<at::Tensor>& out_buffer) {
  cuda::check(logits, targets, "ce_directional_cuda");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), v = logits.size(1);
  const bool has_d = direction.has_value() && direction->defined();
  if (has_d) {
    TORCH_CHECK(direction->sizes() == logits.sizes() && direction->is_contiguous() &&
                    direction->scalar_type() == logits.scalar_type(),
                "ce_directional_cuda: direction must be a contiguous tensor like logits");
  }
  at::Tensor dot = at::zeros({n}, logits.options().dtype(at::kFloat));
  at::Tensor out;
  if (want_out) {
    out = (out_buffer.has_value() && out_buffer->defined()) ? *out_buffer : at::empty_like(logits);
    TORCH_CHECK(out.sizes() == logits.sizes() && out.is_contiguous() &&
                    out.scalar_type() == logits.scalar_type(),
                "ce_directional_cuda: out must be a contiguous tensor like logits");
  }
  auto err = cuda::ce_directional(
      cuda::dtype_of(logits), logits.data_ptr(), targets.data_ptr<int64_t>(),
      cuda::opt_f32(lse, n, "lse"), has_d ? direction->data_ptr() : nullptr,
      cuda::opt_f32(coef_h, n, "coef_h"), cuda::opt_f32(coef_g, n, "coef_g"), n, v, ignore_index,
      dot.data_ptr<float>(), want_out ? out.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ce_directional_cuda: ", cudaGetErrorString(err));
  return {dot, want_out ? out : at::Tensor()};
}

std::vector<at::Tensor> ce_forward_grad_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                             const at::Tensor& coef, int64_t ignore_index,
                                             const at::Tensor& out, int64_t part_bytes,
                                             int64_t slots) {
  cuda::check(logits, targets, "ce_forward_grad_cuda");
  cuda::check_fused(logits, out, part_bytes, slots, "ce_forward_grad_cuda");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(coef.defined(), "ce_forward_grad_cuda: coef (the per-token weights) is required");
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({n}, opts), lse = at::zeros({n}, opts), nll = at::zeros({n}, opts);
  auto err = cuda::ce_forward_grad(
      cuda::dtype_of(logits), logits.data_ptr(), targets.data_ptr<int64_t>(),
      cuda::opt_f32(coef, n, "coef"), n, v, ignore_index, loss.data_ptr<float>(),
      lse.data_ptr<float>(), nll.data_ptr<float>(), out.data_ptr(), part_bytes, slots,
      c10::cuda::getCurrentCUDAStream().stream());
  if (err == cudaErrorNotSupported) {
    (void)cudaGetLastError();  // clear it: the caller runs the two-kernel path instead
    return {};
  }
  TORCH_CHECK(err == cudaSuccess, "ce_forward_grad_cuda: ", cudaGetErrorString(err));
  return {loss, lse, nll, out};
}

std::tuple<std::string, int64_t, int64_t> ce_forward_grad_plan_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& out,
                                                                     int64_t part_bytes,
                                                                     int64_t slots) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
              "ce_forward_grad_plan_cuda: logits must be a contiguous CUDA tensor [N, V]");
  cuda::check_fused(logits, out, part_bytes, slots, "ce_forward_grad_plan_cuda");
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::FusedPlan plan;
  auto err = cuda::ce_forward_grad_plan(cuda::dtype_of(logits), logits.data_ptr(),
                                        out.data_ptr(), logits.size(0), logits.size(1),
                                        part_bytes, slots, &plan);
  if (err == cudaErrorNotSupported) {
    (void)cudaGetLastError();
    plan = cuda::FusedPlan{};
  } else {
    TORCH_CHECK(err == cudaSuccess, "ce_forward_grad_plan_cuda: ", cudaGetErrorString(err));
  }
  const char* kinds[] = {"two kernels", "shared memory", "registers"};
  return {kinds[plan.kind], plan.slots, plan.blocks};
}

}  // namespace gpu
}  // namespace datarater
