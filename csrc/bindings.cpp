// Python bindings of datarater._C.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "datarater C++ kernels (CPU; CUDA when built with it)";
  m.def("ce_forward", &datarater::cpu::ce_forward, "weighted cross-entropy forward (CPU)",
        py::arg("logits"), py::arg("targets"), py::arg("weights"), py::arg("ignore_index"));
  m.def("ce_directional", &datarater::cpu::ce_directional,
        "cross-entropy backward / tangent / forward-over-reverse (CPU)", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("direction"), py::arg("coef_h"),
        py::arg("coef_g"), py::arg("ignore_index"), py::arg("want_out"),
        py::arg("out_buffer"));
  m.def("gelu_fwd_tangent", &datarater::cpu::gelu_fwd_tangent, "GELU with tangent (CPU)");
  m.def("gelu_bwd_tangent", &datarater::cpu::gelu_bwd_tangent, "GELU backward with tangent");
  m.def("softmax_fwd_tangent", &datarater::cpu::softmax_fwd_tangent,
        "attention softmax with tangent (CPU)");
  m.def("softmax_bwd_tangent", &datarater::cpu::softmax_bwd_tangent,
        "attention softmax backward with tangent (CPU)");
  m.def("layer_norm_fwd_tangent", &datarater::cpu::layer_norm_fwd_tangent,
        "LayerNorm with tangent (CPU)");
  m.def("layer_norm_bwd_tangent", &datarater::cpu::layer_norm_bwd_tangent,
        "LayerNorm backward with tangent (CPU)");
#ifdef DATARATER_WITH_CUDA
  m.def("ce_forward_cuda", &datarater::gpu::ce_forward_cuda, "weighted cross-entropy forward (CUDA)",
        py::arg("logits"), py::arg("targets"), py::arg("weights"), py::arg("ignore_index"));
  m.def("ce_directional_cuda", &datarater::gpu::ce_directional_cuda,
        "cross-entropy backward / tangent / forward-over-reverse (CUDA)", py::arg("logits"),
        py::arg("targets"), py::arg("lse"), py::arg("direction"), py::arg("coef_h"),
        py::arg("coef_g"), py::arg("ignore_index"), py::arg("want_out"),
        py::arg("out_buffer"));
  m.def("ce_forward_grad_cuda", &datarater::gpu::ce_forward_grad_cuda,
        "cross-entropy forward and gradient in one pass (CUDA, compute capability 9.0)",
        py::arg("logits"), py::arg("targets"), py::arg("coef"), py::arg("ignore_index"),
        py::arg("out"), py::arg("part_bytes"), py::arg("slots"));
  m.def("ce_forward_grad_plan_cuda", &datarater::gpu::ce_forward_grad_plan_cuda,
        "which fused kernel ce_forward_grad_cuda would run: (kind, slots, blocks per row)",
        py::arg("logits"), py::arg("out"), py::arg("part_bytes"), py::arg("slots"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
