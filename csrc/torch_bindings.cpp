// Every native op of autosteer is declared here, in one place (schema written by hand).
//
// autosteer::steer_step_cpu: the fused per-decode-step AutoSteer op for CPU tensors
// (gather + probe + latch + refusal-logit blend, in place). Out-params carry alias
// annotations: logits, latched and p_out are written, nothing is returned. row_tau: optional
// fp32 [B] per-row latch thresholds that replace tau when given. row_probe: optional int [B]
// probe index per row, with the probe weights stacked ([P, F, H] ...). state_rows: optional int [B]
// entry of the per-request tensors (probe_mask, latched, p_out, row_tau, row_probe) per row.
// probe_extra (Tensor[]?, default None = no extra tensor: torch's schema parser takes no [] default for a
// tensor list) and probe_sum (default 1): the probe reads parts = [probe_hidden, *probe_extra] (each [N, H], probe_hidden's dtype, any strides), k = len(parts) / probe_sum layers (1 <= k <= 4,
// probe_sum 1 or 2); layer l is the fp32 sum of parts[l * probe_sum + j] for j < probe_sum (a serving
// engine's (hidden, residual) pair), and the probe input is the k layers concatenated, k * H values, so W1
// is [F, k * H] (stacked [P, F, k * H]). The op reads them itself: a step needs no cat and no add.
// The Python op torch.ops.autosteer.steer_step (autosteer/runtime/op.py) calls it for CPU tensors.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>

namespace autosteer {
void steer_step_cpu(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                    const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                    const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                    double eps, bool nan_latches, const std::optional<at::Tensor>& row_tau,
                    const std::optional<at::Tensor>& row_probe, const std::optional<at::Tensor>& state_rows,
                    const std::optional<std::vector<at::Tensor>>& probe_extra_opt, int64_t probe_sum);
void steer_step_meta(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                     const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                     const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                     double eps, bool nan_latches, const std::optional<at::Tensor>& row_tau,
                    const std::optional<at::Tensor>& row_probe, const std::optional<at::Tensor>& state_rows,
                     const std::optional<std::vector<at::Tensor>>& probe_extra_opt, int64_t probe_sum);
}  // namespace autosteer

TORCH_LIBRARY(autosteer, m) {
  m.def(
      "steer_step_cpu(Tensor probe_hidden, Tensor probe_rows, Tensor probe_mask, Tensor head_hidden, "
      "Tensor head_rows, Tensor(a!) logits, Tensor(b!) latched, Tensor(c!) p_out, Tensor W1, Tensor b1, "
      "Tensor w2, Tensor b2, Tensor U, Tensor Bt, float tau, float eps, bool nan_latches=False, "
      "Tensor? row_tau=None, Tensor? row_probe=None, Tensor? state_rows=None, Tensor[]? probe_extra=None, "
      "int probe_sum=1) -> ()");
}

TORCH_LIBRARY_IMPL(autosteer, CPU, m) { m.impl("steer_step_cpu", &autosteer::steer_step_cpu); }

TORCH_LIBRARY_IMPL(autosteer, Meta, m) { m.impl("steer_step_cpu", &autosteer::steer_step_meta); }

namespace {
// ADInplaceOrView kernel: bump the version counters of the written out-params (as built-in
// in-place ops do, so autograd can detect a stale saved tensor), then run the kernel.
// torch's generic inplace-or-view fallback only bumps outputs that alias inputs, and this
// op returns nothing.
void bump_written_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size(), base = stack->size() - n;
  for (size_t i = 0; i < n; ++i) {
    const auto& alias = args[i].alias_info();
    const c10::IValue& v = (*stack)[base + i];
    if (alias && alias->isWrite() && v.isTensor()) torch::autograd::impl::bump_version(v.toTensor());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(autosteer, ADInplaceOrView, m) {
  m.impl("steer_step_cpu", torch::CppFunction::makeFromBoxedFunction<&bump_written_then_redispatch>());
}

// `import autosteer._C` loads this library (and so runs the registrations above); the
// module itself is empty. A JIT build loads the same code with torch.ops.load_library.
static struct PyModuleDef autosteer_c_module = {PyModuleDef_HEAD_INIT, "_C", "autosteer native ops (registered in torch.ops.autosteer)", -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&autosteer_c_module); }
