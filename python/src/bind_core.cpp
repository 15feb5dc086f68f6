// Bindings of the optimizer core (lspo/optim_core.h): the one object
// python/lspo/optim.py and lsp.py drive. Per projected layer and step the
// Python face makes one call (on_grad or on_compressed); per step one call to
// step() (which also returns what the wrap handles need) and one to
// zero_grad(). Every call that can wait or compute releases the GIL.
#include <torch/csrc/jit/python/pybind_utils.h>

#include <cmath>

#include "bindings.h"
#include "lspo/dist.h"
#include "lspo/optim_core.h"

namespace py = pybind11;

namespace {

// A Communicator implemented in Python (lspo.distributed.Communicator, on torch.distributed).
class PyCommunicator : public lspo::Communicator {
 public:
  using lspo::Communicator::Communicator;
  int64_t rank() const override { PYBIND11_OVERRIDE_PURE(int64_t, lspo::Communicator, rank, ); }
  int64_t world_size() const override { PYBIND11_OVERRIDE_PURE(int64_t, lspo::Communicator, world_size, ); }
  void reduce_sum(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& owners,
                  const std::string& what) override {
    PYBIND11_OVERRIDE_PURE(void, lspo::Communicator, reduce_sum, tensors, owners, what);
  }
  void broadcast(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& owners,
                 const std::string& what) override {
    PYBIND11_OVERRIDE_PURE(void, lspo::Communicator, broadcast, tensors, owners, what);
  }
  void all_reduce_sum(const torch::Tensor& t, const std::string& what) override {
    PYBIND11_OVERRIDE_PURE(void, lspo::Communicator, all_reduce_sum, t, what);
  }
};

py::object state_to_py(const std::optional<lspo::SlotState>& st) {
  if (!st) return py::none();
  return torch::jit::toPyObject(c10::IValue(lspo::slot_state_to_dict(*st)));
}

lspo::SlotState state_from_py(const py::dict& d) {
  c10::impl::GenericDict g(c10::StringType::get(), c10::AnyType::get());
  for (const auto& kv : d) {
    py::handle v = kv.second;
    if (v.is_none()) continue;
    g.insert(kv.first.cast<std::string>(),
             THPVariable_Check(v.ptr()) ? c10::IValue(v.cast<torch::Tensor>()) : c10::IValue(v.cast<double>()));
  }
  return lspo::slot_state_from_dict(g, "load_state_dict");
}

}  // namespace

LSPO_REGISTER_BINDINGS(core) {
  using lspo::OptimizerCore;
  m.def("default_update_scale", [](const std::string& basis) {
        return lspo::default_update_scale(lspo::parse_basis(basis, "default_update_scale"));
      }, py::arg("basis"), "The update scale an unset LSPAdamW scale means for a basis (sparse 1.0, svd 3.0).");
  m.def("square_state_bytes", &lspo::square_state_bytes, py::arg("m"), py::arg("n"), py::arg("d"), py::arg("r"),
        py::arg("whitened") = true, "State bytes of an [m, n] weight in LSPAdamW's square (d, r) layout.");
  m.def("one_sided_rank", &lspo::one_sided_rank, py::arg("m"), py::arg("n"), py::arg("d"), py::arg("r"),
        py::arg("whitened") = true, py::arg("dense") = false,
        "LSPAdamW(one_sided=True): the projected side's size k of an [m, n] weight (dense: basis='svd').");
  py::class_<lspo::Communicator, PyCommunicator, std::shared_ptr<lspo::Communicator>>(
      m, "Communicator", "The collectives of data parallel (lspo/dist.h); subclassed in lspo.distributed.")
      .def(py::init<>())
      .def("rank", &lspo::Communicator::rank)
      .def("world_size", &lspo::Communicator::world_size);
  py::class_<OptimizerCore, std::shared_ptr<OptimizerCore>>(m, "OptimizerCore")
      .def(
          py::init([](const std::string& name, bool overlap, bool record_timeline, int64_t pinned_limit_bytes,
                      double max_grad_norm, int64_t seed, const std::string& state_dir, int64_t host_memory_limit_bytes,
                      bool resume, bool whiten, std::optional<double> scale, bool scale_auto, bool refit_diagnostics,
                      bool refit_stagger, bool one_sided, const std::string& basis) {
            LSPO_CHECK(seed >= 0, name, ": seed must be >= 0, got ", seed);
            lspo::CoreOptions o;
            o.name = name;
            o.overlap = overlap;
            o.record_timeline = record_timeline;
            o.pinned_limit_bytes = pinned_limit_bytes;
            o.max_grad_norm = max_grad_norm;
            o.seed = static_cast<uint64_t>(seed);
            o.state_dir = state_dir;
            o.host_memory_limit_bytes = host_memory_limit_bytes;
            o.resume = resume;
            o.whiten = whiten;
            o.update_scale = scale;
            o.scale_auto = scale_auto;
            o.refit_diagnostics = refit_diagnostics;
            o.refit_stagger = refit_stagger;
            o.one_sided = one_sided;
            o.basis = lspo::parse_basis(basis, name);
            return std::make_shared<OptimizerCore>(o);
          }),
          py::arg("name"), py::arg("overlap") = true, py::arg("record_timeline") = false,
          py::arg("pinned_limit_bytes") = int64_t(4) << 30, py::arg("max_grad_norm") = 0.0, py::arg("seed") = 0,
          py::arg("state_dir") = "", py::arg("host_memory_limit_bytes") = -1, py::arg("resume") = false,
          py::arg("whiten") = true, py::arg("scale") = py::none(), py::arg("scale_auto") = false,
          py::arg("refit_diagnostics") = false, py::arg("refit_stagger") = false,
          py::arg("one_sided") = false, py::arg("basis") = "sparse")
      .def("allocate_all", &OptimizerCore::allocate_all, py::call_guard<py::gil_scoped_release>())
      .def("resume", &OptimizerCore::resume)
      .def("slots_on_disk", &OptimizerCore::slots_on_disk)
      .def("set_communicator", &OptimizerCore::set_communicator, py::arg("comm"), py::arg("split_min_numel") = 0)
      .def("shard_range", &OptimizerCore::shard_range)
      .def("reduce_pieces", &OptimizerCore::reduce_pieces)
      .def_property_readonly("distributed", &OptimizerCore::distributed)
      .def("owner", &OptimizerCore::owner)
      .def("owns", &OptimizerCore::owns)
      .def("add_param", &OptimizerCore::add_param, py::arg("param"), py::arg("group"), py::arg("projected"),
           py::arg("subspace") = 0, py::arg("nnz") = 0)
      .def_property_readonly("num_slots", &OptimizerCore::num_slots)
      .def(
          "set_groups",
          [](OptimizerCore& c, const std::vector<std::tuple<double, double, double, double, double, int64_t, double,
                                                            int64_t, double, double, double, std::string>>& gs) {
            std::vector<lspo::GroupHyper> v;
            for (const auto& t : gs) {
              lspo::GroupHyper h;
              std::string reinit;
              std::tie(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.refit_every, h.refit_threshold, h.refit_iters,
                       h.refit_lr, h.refit_l2, h.refit_drift, reinit) = t;
              h.refit_reinit = lspo::parse_reinit(reinit, "set_groups");
              v.push_back(h);
            }
            c.set_groups(std::move(v));
          },
          "Per group: (lr, beta1, beta2, eps, weight_decay, refit_every, "
          "refit_threshold, refit_iters, refit_lr, "
          "refit_l2, refit_drift, refit_reinit).")
      .def("set_max_grad_norm", &OptimizerCore::set_max_grad_norm)
      .def("on_grad", &OptimizerCore::on_grad, py::call_guard<py::gil_scoped_release>())
      .def("on_compressed", &OptimizerCore::on_compressed, py::call_guard<py::gil_scoped_release>())
      .def("dense_this_step", &OptimizerCore::dense_this_step)
      .def(
          "step",
          [](OptimizerCore& c, std::optional<double> amp_scale, bool found_inf, bool unscaled_by_caller) {
            lspo::StepInputs in;
            in.amp_scale = amp_scale;
            in.found_inf = found_inf;
            in.unscaled_by_caller = unscaled_by_caller;
            lspo::StepResult r;
            std::vector<int64_t> dense_next;
            {
              py::gil_scoped_release nogil;
              r = c.step(in);
              for (int64_t i = 0; i < c.num_slots(); ++i)
                if (c.is_projected(i) && c.dense_this_step(i)) dense_next.push_back(i);
            }
            return py::make_tuple(r.ran, r.skipped, r.grad_norm, c.grads_modified_after_hook(), dense_next,
                                  static_cast<int64_t>(c.refits().size()));
          },
          py::arg("amp_scale") = py::none(), py::arg("found_inf") = false, py::arg("unscaled_by_caller") = false,
          "Returns (ran, skipped, grad_norm, grads_modified_after_hook, slots "
          "whose next step is dense, "
          "number of refit records).")
      .def("zero_grad", &OptimizerCore::zero_grad, py::call_guard<py::gil_scoped_release>())
      .def("is_projected", &OptimizerCore::is_projected)
      .def("allocated", &OptimizerCore::allocated)
      .def("accumulated",
           [](const OptimizerCore& c, int64_t i) -> py::object {
             torch::Tensor t = c.accumulated(i);
             if (!t.defined()) return py::none();
             return py::cast(t);
           })
      .def("step_count", &OptimizerCore::step_count)
      .def("slot_name", &OptimizerCore::slot_name)
      .def("projectors",
           [](const OptimizerCore& c, int64_t i) {
             auto pq = c.projectors(i);
             auto w = [](const lspo::SparseProjector& P) { return P.whitened() ? py::cast(P.whiten) : py::none(); };
             return py::make_tuple(pq.first.indices, pq.first.values, pq.first.d, w(pq.first), pq.second.indices,
                                   pq.second.values, pq.second.d, w(pq.second));
           })
      .def(
          "state", [](const OptimizerCore& c, int64_t i, bool copy) { return state_to_py(c.state(i, copy)); },
          py::arg("slot"), py::arg("copy") = false)
      .def(
          "load_state",
          [](OptimizerCore& c, int64_t i, const py::dict& d, bool dry_run) {
            c.load_state(i, state_from_py(d), dry_run);
          },
          py::arg("slot"), py::arg("state"), py::arg("dry_run") = false)
      .def(
          "refits",
          [](const OptimizerCore& c, int64_t start) {
            py::list l;
            auto rs = c.refits();
            for (size_t k = static_cast<size_t>(std::max<int64_t>(start, 0)); k < rs.size(); ++k) {
              const auto& r = rs[k];
              py::dict d;
              const lspo::RefitResult& x = r.result;
              d["step"] = r.step;
              d["param"] = r.param;
              d["check"] = r.check;
              d["heldout_before"] = x.heldout_before;
              d["heldout_after"] = x.heldout_after;
              d["fit_before"] = x.fit_before;
              d["fit_after"] = x.fit_after;
              d["fitted"] = x.fitted;
              d["kept"] = x.kept;
              d["reinit"] = x.reinit;
              d["iters"] = x.iters;
              d["seconds"] = x.seconds;
              d["reference_error"] = x.reference_error;
              // the earlier record's names: the check's held-out errors, and
              // whether it changed P, Q
              d["refit"] = x.kept;
              d["error_before"] = x.heldout_before;
              d["error_after"] = x.heldout_after;
              if (!std::isnan(r.random_heldout)) d["random_heldout"] = r.random_heldout;
              l.append(d);
            }
            return l;
          },
          py::arg("start") = 0)
      .def_property_readonly("skipped_steps", &OptimizerCore::skipped_steps)
      .def_property_readonly("last_step_skipped", &OptimizerCore::last_step_skipped)
      .def_property_readonly("last_grad_norm", &OptimizerCore::last_grad_norm)
      .def(
          "wait_all", [](OptimizerCore& c) { c.engine().wait_all(); }, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const OptimizerCore& c) { return lspo::py_bind::stats_dict(c.engine()); })
      .def_property_readonly("overlap", [](const OptimizerCore& c) { return c.engine().options().overlap; })
      .def("now_us", [](const OptimizerCore& c) { return c.engine().now_us(); })
      .def("add_event", [](OptimizerCore& c, const std::string& name, const std::string& cat, int64_t tid, double t0,
                           double t1) { c.engine().add_event(name, cat, tid, t0, t1); })
      .def("timeline_json", [](const OptimizerCore& c) { return c.engine().timeline_json(); })
      .def("clear_timeline", [](OptimizerCore& c) { c.engine().clear_timeline(); })
      .def("set_record_timeline", [](OptimizerCore& c, bool on) { c.engine().set_record_timeline(on); });
}
