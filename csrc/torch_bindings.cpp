// Every native op of autosteer is declared here, in one place (schema written by hand).
//
// autosteer::steer_step_cpu: the fused per-decode-step AutoSteer op for CPU tensors
// (gather + probe + latch + refusal-logit blend, in place). Out-params carry alias
// annotations: logits, latched and p_out are written, nothing is returned. The Python
// op torch.ops.autosteer.steer_step (autosteer/runtime/op.py) calls it for CPU tensors.
#include <Python.h>
#include <torch/library.h>

namespace autosteer {
void steer_step_cpu(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                    const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                    const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                    double eps, bool nan_latches);
void steer_step_meta(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                     const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                     const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                     double eps, bool nan_latches);
}  // namespace autosteer

TORCH_LIBRARY(autosteer, m) {
  m.def(
      "steer_step_cpu(Tensor probe_hidden, Tensor probe_rows, Tensor probe_mask, Tensor head_hidden, "
      "Tensor head_rows, Tensor(a!) logits, Tensor(b!) latched, Tensor(c!) p_out, Tensor W1, Tensor b1, "
      "Tensor w2, Tensor b2, Tensor U, Tensor Bt, float tau, float eps, bool nan_latches=False) -> ()");
}

TORCH_LIBRARY_IMPL(autosteer, CPU, m) { m.impl("steer_step_cpu", &autosteer::steer_step_cpu); }

TORCH_LIBRARY_IMPL(autosteer, Meta, m) { m.impl("steer_step_cpu", &autosteer::steer_step_meta); }

// `import autosteer._C` loads this library (and so runs the registrations above); the
// module itself is empty. A JIT build loads the same code with torch.ops.load_library.
static struct PyModuleDef autosteer_c_module = {PyModuleDef_HEAD_INIT, "_C", "autosteer native ops (registered in torch.ops.autosteer)", -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&autosteer_c_module); }
