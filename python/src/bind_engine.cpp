// Bindings of the offload engine (lspo/engine.h). Long calls release the GIL.
#include "bindings.h"
#include "lspo/engine.h"

namespace py = pybind11;

static lspo::StateKind state_kind(const std::string& k) {
  if (k == "master" || k == "master_param") return lspo::StateKind::kMaster;
  if (k == "exp_avg") return lspo::StateKind::kExpAvg;
  if (k == "exp_avg_sq") return lspo::StateKind::kExpAvgSq;
  LSPO_CHECK(false, "OffloadEngine: state kind must be 'master', 'exp_avg' or 'exp_avg_sq', got '", k, "'");
  return lspo::StateKind::kMaster;
}

pybind11::dict lspo::py_bind::stats_dict(const lspo::OffloadEngine& e) {
  auto s = e.stats();
  py::dict d;
  d["pinned_bytes"] = s.pinned_bytes;
  d["pageable_bytes"] = s.pageable_bytes;
  d["pin_fallbacks"] = s.pin_fallbacks;
  d["jobs_run"] = s.jobs_run;
  d["commits"] = s.commits;
  d["host_state_bytes"] = s.host_state_bytes;
  d["disk_state_bytes"] = s.disk_state_bytes;
  d["disk_slots"] = s.disk_slots;
  d["io_buffer_bytes"] = s.io_buffer_bytes;
  d["io_bytes_read"] = s.io_bytes_read;
  d["io_bytes_written"] = s.io_bytes_written;
  d["persists"] = s.persists;
  d["slots_allocated"] = e.num_slots();
  return d;
}

LSPO_REGISTER_BINDINGS(engine) {
  py::class_<lspo::OffloadEngine, std::shared_ptr<lspo::OffloadEngine>>(m, "OffloadEngine")
      .def(py::init([](bool overlap, bool record_timeline, int64_t pinned_limit_bytes, bool try_pin,
                       const std::string& state_dir, int64_t host_memory_limit_bytes, bool resume,
                       int64_t io_chunk_elems, int64_t io_depth, bool direct_io) {
             lspo::EngineOptions o;
             o.overlap = overlap;
             o.record_timeline = record_timeline;
             o.pinned_limit_bytes = pinned_limit_bytes;
             o.try_pin = try_pin;
             o.state_dir = state_dir;
             o.host_memory_limit_bytes = host_memory_limit_bytes;
             o.resume = resume;
             o.io_chunk_elems = io_chunk_elems;
             o.io_depth = io_depth;
             o.direct_io = direct_io;
             return std::make_shared<lspo::OffloadEngine>(o);
           }),
           py::arg("overlap") = true, py::arg("record_timeline") = false,
           py::arg("pinned_limit_bytes") = int64_t(4) << 30, py::arg("try_pin") = true, py::arg("state_dir") = "",
           py::arg("host_memory_limit_bytes") = -1, py::arg("resume") = false,
           py::arg("io_chunk_elems") = int64_t(1) << 18, py::arg("io_depth") = 4, py::arg("direct_io") = true)
      .def("add_slot",
           [](lspo::OffloadEngine& e, const std::string& name, const c10::optional<at::Tensor>& master, int64_t numel,
              at::ScalarType grad_dtype, at::ScalarType out_dtype, int64_t order) {
             return e.add_slot(name, master ? *master : at::Tensor(), numel, grad_dtype, out_dtype, order);
           },
           py::arg("name"), py::arg("master"), py::arg("numel"), py::arg("grad_dtype"), py::arg("out_dtype"),
           py::arg("order"))
      .def_property_readonly("num_slots", &lspo::OffloadEngine::num_slots)
      .def("grad_buffer", &lspo::OffloadEngine::grad_buffer)
      .def("out_buffer", &lspo::OffloadEngine::out_buffer)
      .def("master", [](lspo::OffloadEngine& e, int64_t s) -> py::object {
        at::Tensor t = e.master(s);
        if (!t.defined()) return py::none();
        return py::cast(t);
      })
      .def("exp_avg", &lspo::OffloadEngine::exp_avg)
      .def("on_disk", &lspo::OffloadEngine::on_disk)
      .def("committed_step", &lspo::OffloadEngine::committed_step)
      .def("load_state", [](lspo::OffloadEngine& e, int64_t slot, const std::string& kind) -> py::object {
        lspo::StateKind k = state_kind(kind);
        at::Tensor t;
        {
          py::gil_scoped_release nogil;
          t = e.load_state(slot, k);
        }
        if (!t.defined()) return py::none();
        return py::cast(t);
      }, py::arg("slot"), py::arg("kind"))
      .def("store_state", [](lspo::OffloadEngine& e, int64_t slot, const std::string& kind, const at::Tensor& v) {
        lspo::StateKind k = state_kind(kind);
        py::gil_scoped_release nogil;
        e.store_state(slot, k, v);
      }, py::arg("slot"), py::arg("kind"), py::arg("value"))
      .def("persist", &lspo::OffloadEngine::persist, py::call_guard<py::gil_scoped_release>())
      .def("exp_avg_sq", &lspo::OffloadEngine::exp_avg_sq)
      .def("submit",
           [](lspo::OffloadEngine& e, int64_t slot, int64_t step, double lr, double beta1, double beta2, double eps,
              double weight_decay, double grad_scale, uintptr_t ready_event) {
             lspo::AdamConfig c;
             c.lr = lr;
             c.beta1 = beta1;
             c.beta2 = beta2;
             c.eps = eps;
             c.weight_decay = weight_decay;
             c.adamw_mode = true;
             c.grad_scale = grad_scale;
             py::gil_scoped_release nogil;
             e.submit(slot, c, step, ready_event);
           },
           py::arg("slot"), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("grad_scale") = 1.0, py::arg("ready_event") = 0)
      .def("wait", &lspo::OffloadEngine::wait, py::call_guard<py::gil_scoped_release>())
      .def("wait_all", &lspo::OffloadEngine::wait_all, py::call_guard<py::gil_scoped_release>())
      .def("commit", &lspo::OffloadEngine::commit, py::call_guard<py::gil_scoped_release>())
      .def("has_result", &lspo::OffloadEngine::has_result)
      .def("stats", [](const lspo::OffloadEngine& e) { return lspo::py_bind::stats_dict(e); })
      .def_property_readonly("overlap", [](const lspo::OffloadEngine& e) { return e.options().overlap; })
      .def("set_record_timeline", &lspo::OffloadEngine::set_record_timeline)
      .def("now_us", &lspo::OffloadEngine::now_us)
      .def("add_event", &lspo::OffloadEngine::add_event)
      .def("timeline", [](const lspo::OffloadEngine& e) {
        py::list l;
        for (const auto& ev : e.timeline()) l.append(py::make_tuple(ev.name, ev.cat, ev.tid, ev.t0_us, ev.t1_us));
        return l;
      })
      .def("timeline_json", &lspo::OffloadEngine::timeline_json)
      .def("clear_timeline", &lspo::OffloadEngine::clear_timeline);
}
