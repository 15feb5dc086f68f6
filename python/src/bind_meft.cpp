// Bindings of the row-sparse (lazy) Adam and the row gather (lspo/sparse_adam.h), the host side of
// lspo.meft. Tensors are checked and converted in tensor_checks.h; the GIL is released around the
// kernels so that lspo.meft can run them on a worker thread while autograd continues.
#include "bindings.h"
#include "lspo/sparse_adam.h"
#include "tensor_checks.h"

namespace {

using lspo::DType;
using lspo::tensor_checks::Arg;
constexpr auto kCPU = c10::DeviceType::CPU;

void check_index(const at::Tensor& t, const char* fn, const char* name) {
  LSPO_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
             fn, ": argument '", name, "' must be a contiguous 1-D CPU torch.int64 tensor, got ",
             t.defined() ? lspo::tensor_checks::torch_dtype_name(t.scalar_type()) : std::string("undefined"),
             " on ", t.defined() ? t.device().str() : std::string("-"), " with ", t.defined() ? t.dim() : 0,
             " dims");
}

void sparse_adam_step_tensors(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                              const at::Tensor& row_steps, const at::Tensor& idx, const at::Tensor& grad,
                              const c10::optional<at::Tensor>& param_out, double lr, double beta1, double beta2,
                              double eps, double weight_decay, bool adamw_mode, bool bias_correction, bool maximize,
                              double grad_scale) {
  const char* fn = "sparse_adam_step";
  Arg p = std::move(Arg(param, fn, "param").device(kCPU).contiguous().dtype({DType::kFloat32}));
  LSPO_CHECK(param.dim() == 2, fn, ": argument 'param' must be 2-D [rows, row_len], got sizes ", param.sizes());
  const int64_t rows = param.size(0), len = param.size(1);
  Arg m = std::move(Arg(exp_avg, fn, "exp_avg").device(kCPU).contiguous().dtype({DType::kFloat32})
                        .sizes(param.sizes(), "param"));
  Arg v = std::move(Arg(exp_avg_sq, fn, "exp_avg_sq").device(kCPU).contiguous().dtype({DType::kFloat32})
                        .sizes(param.sizes(), "param"));
  check_index(row_steps, fn, "row_steps");
  LSPO_CHECK(row_steps.numel() == rows, fn, ": argument 'row_steps' has ", row_steps.numel(), " entries but 'param' has ",
             rows, " rows");
  check_index(idx, fn, "idx");
  const int64_t n = idx.numel();
  Arg g = std::move(Arg(grad, fn, "grad").device(kCPU).contiguous().dtype({DType::kFloat32, DType::kBFloat16}));
  LSPO_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == len, fn, ": argument 'grad' must have sizes [",
             n, ", ", len, "] (len(idx), row_len), got ", grad.sizes());
  lspo::SparseAdamBuffers b{p.ptr_as<float>(), m.ptr_as<float>(), v.ptr_as<float>(),
                            row_steps.numel() ? row_steps.data_ptr<int64_t>() : nullptr, nullptr, DType::kBFloat16,
                            rows, len};
  std::vector<Arg> extra;
  if (param_out) {
    Arg o = std::move(Arg(*param_out, fn, "param_out").device(kCPU).contiguous()
                          .dtype({DType::kFloat32, DType::kBFloat16, DType::kFloat16}).sizes(param.sizes(), "param"));
    b.param_out = o.ptr();
    b.out_dtype = o.lspo_dtype();
    lspo::tensor_checks::check_no_overlap(fn, {&o, &p, &m, &v, &g});
  }
  lspo::tensor_checks::check_no_overlap(fn, {&p, &m, &v, &g});
  const lspo::AdamConfig cfg{lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction, maximize, grad_scale};
  lspo::SparseRows r{n ? idx.data_ptr<int64_t>() : nullptr, g.ptr(), g.lspo_dtype(), n};
  lspo::check_sparse_adam_args(cfg, b, r);
  pybind11::gil_scoped_release nogil;
  lspo::sparse_adam_step(cfg, b, r);
}

void gather_rows_tensors(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& out) {
  const char* fn = "gather_rows";
  LSPO_CHECK(src.defined() && src.device().is_cpu() && src.is_contiguous() && src.dim() == 2, fn,
             ": argument 'src' must be a contiguous 2-D CPU tensor");
  check_index(idx, fn, "idx");
  LSPO_CHECK(out.defined() && out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 &&
                 out.scalar_type() == src.scalar_type(),
             fn, ": argument 'out' must be a contiguous 2-D CPU tensor of src's dtype");
  LSPO_CHECK(out.size(0) >= idx.numel() && out.size(1) == src.size(1), fn, ": argument 'out' has sizes ", out.sizes(),
             ", needs at least [", idx.numel(), ", ", src.size(1), "]");
  const int64_t row_bytes = src.size(1) * static_cast<int64_t>(src.element_size());
  const int64_t n = idx.numel();
  const void* s = src.numel() ? src.data_ptr() : nullptr;
  void* d = out.numel() ? out.data_ptr() : nullptr;
  const int64_t* ip = n ? idx.data_ptr<int64_t>() : nullptr;
  pybind11::gil_scoped_release nogil;
  lspo::gather_rows(s, src.size(0), row_bytes, ip, n, d);
}

}  // namespace

LSPO_REGISTER_BINDINGS(meft) {
  namespace py = pybind11;
  m.def("sparse_adam_step", &sparse_adam_step_tensors, py::arg("param"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("row_steps"), py::arg("idx"), py::arg("grad"), py::kw_only(), py::arg("param_out") = py::none(),
        py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.999, py::arg("eps") = 1e-8,
        py::arg("weight_decay") = 0.0, py::arg("adamw_mode") = true, py::arg("bias_correction") = true,
        py::arg("maximize") = false, py::arg("grad_scale") = 1.0,
        "Lazy (row-sparse) Adam/AdamW step, in place (lspo::sparse_adam_step).\n"
        "param, exp_avg, exp_avg_sq: fp32 [rows, row_len]; row_steps: int64 [rows], the steps each row has\n"
        "taken (touched rows += 1, bias correction per row); idx: int64 [n] strictly increasing rows;\n"
        "grad: fp32/bf16 [n, row_len], row j for row idx[j]; param_out: optional [rows, row_len] working copy\n"
        "whose touched rows are rewritten. Untouched rows are not read or written. Releases the GIL.");
  m.def("gather_rows", &gather_rows_tensors, py::arg("src"), py::arg("idx"), py::arg("out"),
        "out[j] = src[idx[j]] for j < len(idx) (2-D contiguous CPU tensors of one dtype; out may be a\n"
        "larger pinned staging buffer). Threaded memcpy of whole rows; releases the GIL.");
}
