// Bindings of the fused CPU Adam (lspo/cpu_adam.h) and of the STREAM-triad bandwidth loop
// (lspo/membench.h). Tensors are checked and converted in tensor_checks.h.
#include "bindings.h"
#include "lspo/cpu_adam.h"
#include "lspo/membench.h"
#include "tensor_checks.h"

namespace {

using lspo::DType;
using lspo::tensor_checks::Arg;
constexpr auto kCPU = c10::DeviceType::CPU;

void adam_step_tensors(const c10::optional<at::Tensor>& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const at::Tensor& grad, const c10::optional<at::Tensor>& param_out, int64_t step, double lr,
                       double beta1, double beta2, double eps, double weight_decay, bool adamw_mode,
                       bool bias_correction, bool maximize, double grad_scale) {
  const char* fn = "adam_step";
  Arg m = std::move(Arg(exp_avg, fn, "exp_avg").device(kCPU).contiguous().dtype({DType::kFloat32}));
  const int64_t n = m.numel();
  Arg v = std::move(Arg(exp_avg_sq, fn, "exp_avg_sq").device(kCPU).contiguous().dtype({DType::kFloat32}).numel(n, "exp_avg"));
  Arg g = std::move(Arg(grad, fn, "grad").device(kCPU).contiguous()
                        .dtype({DType::kFloat32, DType::kBFloat16, DType::kFloat16}).numel(n, "exp_avg"));
  lspo::AdamBuffers b;
  b.n = n;
  b.exp_avg = m.ptr_as<float>();
  b.exp_avg_sq = v.ptr_as<float>();
  b.grad = g.ptr();
  b.grad_dtype = g.lspo_dtype();
  std::vector<Arg> extra;
  if (param) {
    Arg p = std::move(Arg(*param, fn, "param").device(kCPU).contiguous().dtype({DType::kFloat32}).numel(n, "exp_avg"));
    b.param = p.ptr_as<float>();
    lspo::tensor_checks::check_no_overlap(fn, {&p, &m, &v, &g});
    extra.push_back(std::move(p));
  }
  if (param_out) {
    Arg o = std::move(Arg(*param_out, fn, "param_out").device(kCPU).contiguous()
                          .dtype({DType::kFloat32, DType::kBFloat16, DType::kFloat16}).numel(n, "exp_avg"));
    b.param_out = o.ptr();
    b.out_dtype = o.lspo_dtype();
    lspo::tensor_checks::check_no_overlap(fn, {&o, &m, &v, &g});
    if (!extra.empty()) lspo::tensor_checks::check_no_overlap(fn, {&o, &extra[0]});
  }
  lspo::tensor_checks::check_no_overlap(fn, {&m, &v, &g});
  LSPO_CHECK(param || param_out, fn, ": moments-only mode (param=None) needs param_out to receive the update");
  lspo::AdamConfig cfg;
  cfg.lr = lr;
  cfg.beta1 = beta1;
  cfg.beta2 = beta2;
  cfg.eps = eps;
  cfg.weight_decay = weight_decay;
  cfg.adamw_mode = adamw_mode;
  cfg.bias_correction = bias_correction;
  cfg.maximize = maximize;
  cfg.grad_scale = grad_scale;
  lspo::check_adam_args(cfg, step, b);
  pybind11::gil_scoped_release nogil;
  lspo::adam_step(cfg, step, b);
}

bool all_finite_tensor(const at::Tensor& t) {
  Arg a = std::move(Arg(t, "all_finite", "tensor").device(kCPU).contiguous()
                        .dtype({DType::kFloat32, DType::kBFloat16, DType::kFloat16}));
  pybind11::gil_scoped_release nogil;
  return lspo::all_finite(a.ptr(), a.lspo_dtype(), a.numel());
}

pybind11::dict stream_triad(int64_t n, int reps, bool streaming_stores, bool in_place) {
  lspo::TriadResult r;
  {
    pybind11::gil_scoped_release nogil;
    r = lspo::measure_triad(n, reps, nullptr, streaming_stores, in_place);
  }
  pybind11::dict d;
  d["n"] = r.n;
  d["reps"] = r.reps;
  d["best_seconds"] = r.best_seconds;
  d["bytes_per_pass"] = r.bytes_per_pass;
  d["bytes_per_s"] = r.best_bytes_per_s;
  return d;
}

}  // namespace

LSPO_REGISTER_BINDINGS(adam) {
  namespace py = pybind11;
  m.def("adam_step", &adam_step_tensors, py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad"),
        py::kw_only(), py::arg("param_out") = py::none(), py::arg("step"), py::arg("lr"), py::arg("beta1") = 0.9,
        py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("adamw_mode") = true,
        py::arg("bias_correction") = true, py::arg("maximize") = false, py::arg("grad_scale") = 1.0,
        "One fused Adam/AdamW step over contiguous CPU tensors, in place (lspo::adam_step).\n"
        "param: fp32 master params or None (moments-only: the update goes to param_out); exp_avg,\n"
        "exp_avg_sq: fp32; grad: fp32/bf16/fp16; param_out: optional fp32/bf16/fp16 copy of the updated\n"
        "param written in the same pass. `step` counts this update (1-based). Releases the GIL.");
  m.def("all_finite", &all_finite_tensor, py::arg("tensor"),
        "True when a contiguous CPU fp32/bf16/fp16 tensor holds no inf/NaN (vectorised, threaded).");
  m.def("stream_triad", &stream_triad, py::arg("n") = int64_t{1} << 25, py::arg("reps") = 5, py::arg("streaming_stores") = false, py::arg("in_place") = false,
        "STREAM triad a = b + s*c over three fp32 arrays of n elements on lspo's thread pool; returns\n"
        "{'bytes_per_s', 'best_seconds', 'bytes_per_pass' (12 n), 'n', 'reps'} for the fastest of reps passes.\n"
        "streaming_stores: write `a` with non-temporal stores (no read-for-ownership of `a`).\n"
        "in_place: time a = a + s*c instead (in-place update, 12 bytes/element, no read-for-ownership).");
}
