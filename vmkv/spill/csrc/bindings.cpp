// Python bindings of the spill index. Calls are short critical sections under a
// process-shared lock; the GIL is released around each. Keys cross as 16-byte `bytes`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "blake2b.h"
#include "index.h"

namespace py = pybind11;
using namespace vmkv::spill;

namespace {

PyObject* g_segment_error = nullptr;

std::vector<std::string> key_list(const py::sequence& keys) {
  std::vector<std::string> out;
  out.reserve(keys.size());
  for (const py::handle& key : keys) {
    if (!py::isinstance<py::bytes>(key)) throw std::invalid_argument("spill keys must be bytes");
    out.push_back(key.cast<std::string>());
  }
  return out;
}

py::dict geometry_dict(const Geometry& g) {
  py::dict d;
  d["slot_count"] = g.slot_count;
  d["slot_bytes"] = g.slot_bytes;
  d["slot_stride"] = g.slot_stride;
  d["bucket_count"] = g.bucket_count;
  d["data_offset"] = g.data_offset;
  d["total_bytes"] = g.total_bytes;
  return d;
}

}  // namespace

PYBIND11_MODULE(_index, m) {
  m.doc() = "vmkv spill tier: the shared index of host slots (robust process-shared lock)";
  g_segment_error = PyErr_NewExceptionWithDoc("vmkv.spill._index.SegmentError",
                                              "The spill segment is corrupted, foreign or of another version.",
                                              PyExc_RuntimeError, nullptr);
  m.add_object("SegmentError", py::handle(g_segment_error));
  py::register_local_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const SegmentError& error) {
      PyErr_SetString(g_segment_error, error.what());
    }
  });
  m.attr("KEY_BYTES") = kKeyBytes;

  py::class_<KeyedBlake2b>(m, "KeyedHasher", "Keyed BLAKE2b with the spill key's digest size.")
      .def(py::init([](const py::bytes& key) { return KeyedBlake2b(std::string(key), kKeyBytes); }), py::arg("key"))
      .def(
          "digests",
          [](const KeyedBlake2b& hasher, const py::list& messages, const py::bytes& prefix) {
            py::list out(messages.size());
            std::string message = prefix;
            const size_t prefix_size = message.size();
            size_t i = 0;
            for (const py::handle& item : messages) {
              if (!PyBytes_Check(item.ptr())) throw std::invalid_argument("messages must be bytes");
              char* data = nullptr;
              Py_ssize_t size = 0;
              PyBytes_AsStringAndSize(item.ptr(), &data, &size);
              message.resize(prefix_size);
              message.append(data, static_cast<size_t>(size));
              out[i++] = py::bytes(hasher.digest(message));
            }
            return out;
          },
          py::arg("messages"), py::arg("prefix") = py::bytes(""),
          "The digest of prefix + message for each bytes message, in order.");
  m.attr("MAX_PROCS") = kMaxProcs;

  py::enum_<Policy>(m, "Policy").value("LRU", Policy::kLru).value("FIFO", Policy::kFifo).value("LFU", Policy::kLfu);

  m.def(
      "geometry", [](uint64_t slot_count, uint64_t slot_bytes) { return geometry_dict(geometry_for(slot_count, slot_bytes)); },
      py::arg("slot_count"), py::arg("slot_bytes"), "Byte layout of a segment with these slots.");

  using release_gil = py::call_guard<py::gil_scoped_release>;
  py::class_<Index>(m, "Index")
      // The index points into memory that `owner` keeps mapped; keep_alive ties them.
      .def(py::init([](const py::object& /*owner*/, uintptr_t address, size_t size) { return Index(address, size); }),
           py::arg("owner"), py::arg("address"), py::arg("size"), py::keep_alive<1, 2>())
      .def_property_readonly("initialized", &Index::initialized)
      .def(
          "initialize",
          [](Index& index, uint64_t slot_count, uint64_t slot_bytes, Policy policy, const py::bytes& digest) {
            index.initialize(geometry_for(slot_count, slot_bytes), policy, digest);
          },
          py::arg("slot_count"), py::arg("slot_bytes"), py::arg("policy"), py::arg("namespace_digest"))
      .def("header",
           [](Index& index) {
             Header h;
             {
               py::gil_scoped_release release;
               h = index.header_copy();
             }
             py::dict d = geometry_dict(h.geometry);
             d["version"] = h.version;
             d["policy"] = static_cast<Policy>(h.policy);
             d["namespace_digest"] =
                 py::bytes(reinterpret_cast<const char*>(h.namespace_digest), sizeof(h.namespace_digest));
             return d;
           })
      .def("attach", &Index::attach, py::arg("pid"), release_gil())
      .def("detach", &Index::detach, py::arg("proc"), release_gil(),
           "Drop this process's reservations and pins; returns the processes still attached.")
      .def(
          "reserve",
          [](Index& index, uint32_t proc, const py::sequence& keys) -> py::object {
            std::vector<std::string> list = key_list(keys);
            std::optional<std::vector<int64_t>> slots;
            {
              py::gil_scoped_release release;
              slots = index.reserve(proc, list);
            }
            if (!slots) return py::none();
            return py::cast(*slots);
          },
          py::arg("proc"), py::arg("keys"),
          "Slots for absent keys (-1: present or repeated), or None when the tier cannot make room.")
      .def("commit", &Index::commit, py::arg("proc"), py::arg("slots"), release_gil())
      .def("abort", &Index::abort, py::arg("proc"), py::arg("slots"), release_gil())
      .def(
          "lookup",
          [](Index& index, const py::sequence& keys) {
            std::vector<std::string> list = key_list(keys);
            py::gil_scoped_release release;
            return index.lookup(list);
          },
          py::arg("keys"))
      .def(
          "pin",
          [](Index& index, uint32_t proc, const py::sequence& keys) {
            std::vector<std::string> list = key_list(keys);
            int64_t missing = -1;
            std::vector<int64_t> slots;
            {
              py::gil_scoped_release release;
              slots = index.pin(proc, list, &missing);
            }
            return py::make_tuple(slots, missing);
          },
          py::arg("proc"), py::arg("keys"), "(slots, -1), or ([], index of the first key not in the tier).")
      .def("unpin", &Index::unpin, py::arg("proc"), py::arg("slots"), release_gil())
      .def("state", &Index::state, py::arg("key"), release_gil())
      .def("sweep", &Index::sweep, release_gil())
      .def("stats", [](Index& index) {
        Stats s;
        {
          py::gil_scoped_release release;
          s = index.stats();
        }
        py::dict d;
        d["slot_count"] = s.geometry.slot_count;
        d["slot_bytes"] = s.geometry.slot_bytes;
        d["valid"] = s.valid;
        d["writing"] = s.writing;
        d["pinned"] = s.pinned;
        d["free"] = s.free;
        d["attached"] = s.attached;
        const Counters& c = s.counters;
        for (const auto& [name, value] : {std::pair{"stored", c.stored}, {"hits", c.hits}, {"misses", c.misses},
                                          {"evictions", c.evictions}, {"retrieves", c.retrieves},
                                          {"aborted", c.aborted}, {"lock_recoveries", c.lock_recoveries}}) {
          d[name] = value;
        }
        return d;
      });
}
