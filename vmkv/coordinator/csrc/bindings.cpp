// Python bindings of the coordinator table. Calls are short critical sections; the GIL is
// released around each so a blocked lock never stalls the interpreter's other threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "table.h"

namespace py = pybind11;
using namespace vmkv::coord;

namespace {

PyObject* g_segment_error = nullptr;

py::dict histogram_dict(const Histogram& h) {
  py::list bounds;
  for (uint64_t b : kBucketBoundsNs) bounds.append(b);
  py::list counts;
  for (uint64_t c : h.counts) counts.append(c);
  py::dict d;
  d["bounds_ns"] = bounds;
  d["counts"] = counts;
  d["sum_ns"] = h.sum_ns;
  return d;
}

// A name field as str: never past its bytes (it was copied after validation, but the copy
// may still race a writer), and bytes that are not UTF-8 shown as U+FFFD, not an error.
py::str text(const char* field, size_t capacity) {
  PyObject* decoded = PyUnicode_DecodeUTF8(field, static_cast<Py_ssize_t>(strnlen(field, capacity)), "replace");
  if (decoded == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(decoded);
}

py::dict view_dict(const SlotView& v) {
  const Slot& s = v.slot;
  py::dict d;
  d["slot"] = v.index;
  d["pid"] = s.pid;
  d["generation"] = s.generation;
  d["name"] = text(s.name, kNameBytes);
  d["engine"] = text(s.engine, kEngineBytes);
  d["model"] = text(s.model, kModelBytes);
  d["min_pages"] = s.min_pages;
  d["max_pages"] = s.max_pages;
  d["weight"] = s.weight;
  d["fair_pages"] = v.fair_pages;
  d["leased"] = s.leased;
  d["held"] = s.held;
  d["mapped"] = s.mapped;
  d["reclaimable"] = s.reclaimable;
  d["reclaim_request"] = s.reclaim_request;
  d["awaiting"] = s.awaiting;
  d["heartbeat_age_s"] = static_cast<double>(monotonic_ns() - s.heartbeat_ns) / 1e9;
  d["grants"] = s.grants;
  d["misses"] = s.misses;
  d["reclaims"] = s.reclaims;
  d["reclaimed_pages"] = s.reclaimed_pages;
  d["grant_latency"] = histogram_dict(s.grant_latency);
  d["reclaim_latency"] = histogram_dict(s.reclaim_latency);
  d["alive"] = v.alive;
  return d;
}

}  // namespace

PYBIND11_MODULE(_table, m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "vmkv coordinator: the shared lease table (robust process-shared lock)";
  g_segment_error = PyErr_NewExceptionWithDoc(
      "vmkv.coordinator._table.SegmentError",
      "The coordinator segment is corrupted, foreign or of another version.", PyExc_RuntimeError, nullptr);
  m.add_object("SegmentError", py::handle(g_segment_error));
  py::register_local_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const SegmentError& error) {
      PyErr_SetString(g_segment_error, error.what());
    }
  });

  py::enum_<Outcome>(m, "Outcome")
      .value("GRANTED", Outcome::kGranted)
      .value("MISS_MAX", Outcome::kMissMax)
      .value("MISS_FAIR", Outcome::kMissFair)
      .value("MISS_NO_VICTIM", Outcome::kMissNoVictim)
      .value("MISS_OWING", Outcome::kMissOwing)
      .value("RECLAIMING", Outcome::kReclaiming);

  m.attr("SEGMENT_SIZE") = Table::segment_size();

  py::class_<Table>(m, "Table")
      // The table points into memory that `owner` keeps mapped; keep_alive ties the two
      // together so a table can never outlive its mapping.
      .def(py::init([](const py::object& /*owner*/, uintptr_t address, size_t size) { return Table(address, size); }),
           py::arg("owner"), py::arg("address"), py::arg("size"), py::keep_alive<1, 2>())
      .def_property_readonly("initialized", &Table::initialized)
      .def_property_readonly("page_size", &Table::page_size)
      .def("initialize", &Table::initialize, py::arg("page_size"), py::arg("budget_pages"))
      .def("register", &Table::register_instance, py::arg("name"), py::arg("engine"), py::arg("model"),
           py::arg("min_pages"), py::arg("max_pages"), py::arg("weight"), py::arg("pid"), release_gil())
      .def("deregister", &Table::deregister, py::arg("slot"), py::arg("generation"), release_gil())
      .def(
          "request",
          [](Table& t, uint32_t slot, uint64_t generation, uint64_t pages, uint64_t waited_ns) {
            RequestResult r;
            {
              py::gil_scoped_release release;
              r = t.request(slot, generation, pages, waited_ns);
            }
            return py::make_tuple(r.outcome, r.victims);
          },
          py::arg("slot"), py::arg("generation"), py::arg("pages"), py::arg("waited_ns") = 0)
      .def("try_grant", &Table::try_grant, py::arg("slot"), py::arg("generation"), py::arg("pages"),
           py::arg("waited_ns"), release_gil())
      // No GIL release: an engine's scheduler asks at every step, the call takes a
      // microsecond, and a release lets a busy thread of the engine's run first.
      .def("headroom", &Table::headroom, py::arg("slot"), py::arg("generation"))
      .def("note_miss", &Table::note_miss, py::arg("slot"), py::arg("generation"), py::arg("waited_ns"),
           release_gil())
      .def("release", &Table::release, py::arg("slot"), py::arg("generation"), py::arg("pages"), py::arg("held"),
           py::arg("mapped"), release_gil())
      .def("report", &Table::report, py::arg("slot"), py::arg("generation"), py::arg("held"), py::arg("mapped"),
           release_gil())
      .def("heartbeat", &Table::heartbeat, py::arg("slot"), py::arg("generation"), py::arg("reclaimable"),
           py::arg("owed") = 0, release_gil(),
           "Heartbeat, sweep the dead; returns the pages this instance is asked to give back beyond what it owes.")
      .def("finish_reclaim", &Table::finish_reclaim, py::arg("slot"), py::arg("generation"), py::arg("released"),
           py::arg("refused") = 0, release_gil())
      .def("set_limits", &Table::set_limits, py::arg("name"), py::arg("min_pages") = -1,
           py::arg("max_pages") = -1, py::arg("weight") = -1, release_gil(),
           "Change an instance's limits (-1 keeps a value); returns its slot.")
      .def("set_budget", &Table::set_budget, py::arg("budget_pages"), release_gil())
      .def("sweep", &Table::sweep, release_gil(), "Free the slots of dead processes; returns their slots.")
      .def("snapshot",
           [](Table& t) {
             std::vector<SlotView> views;
             {
               py::gil_scoped_release release;
               views = t.snapshot();
             }
             py::list out;
             for (const SlotView& v : views) out.append(view_dict(v));
             return out;
           })
      .def("header",
           [](Table& t) {
             Header h;
             {
               py::gil_scoped_release release;
               h = t.header_copy();
             }
             py::dict d;
             d["version"] = h.version;
             d["page_size"] = h.page_size;
             d["budget_pages"] = h.budget_pages;
             d["lock_recoveries"] = h.lock_recoveries;
             d["max_slots"] = h.max_slots;
             return d;
           })
      .def("lock_unlock", &Table::lock_unlock, release_gil())
      .def("lock_cycles", &Table::lock_cycles, py::arg("count"), release_gil());
}
