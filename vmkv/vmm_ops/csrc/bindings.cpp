// Python bindings of the torch-free core. Every call that reaches a driver releases the
// GIL; arguments are converted before, results after.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "vmm.h"

namespace py = pybind11;

namespace vmkv {
namespace {

PyObject* g_driver_error = nullptr;
PyObject* g_out_of_memory = nullptr;

// Owns the Vmm so that close() tears it down deterministically; later calls get an error.
class VmmHandle {
 public:
  explicit VmmHandle(std::unique_ptr<Vmm> vmm) : vmm_(std::move(vmm)) {}
  Vmm& get() {
    if (!vmm_) throw std::invalid_argument("this Vmm is closed");
    return *vmm_;
  }
  void close() { vmm_.reset(); }
  bool closed() const { return !vmm_; }

 private:
  std::unique_ptr<Vmm> vmm_;
};

// Sizes and counts arrive as signed integers so that a negative one is a ValueError that
// names it, not pybind's "incompatible function arguments".
size_t non_negative(long long value, const char* what) {
  if (value < 0) throw std::invalid_argument(std::string(what) + " must be >= 0, got " + std::to_string(value));
  return static_cast<size_t>(value);
}

std::unique_ptr<VmmHandle> open_vmm(const std::string& kind, long long device_index, long long page_bytes,
                                    long long capacity_bytes) {
  if (non_negative(device_index, "device") > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw std::invalid_argument("device " + std::to_string(device_index) + " is out of range");
  }
  const int device = static_cast<int>(device_index);
  size_t page_size = non_negative(page_bytes, "page_size");
  const size_t host_capacity = non_negative(capacity_bytes, "host_capacity");
  std::unique_ptr<Driver> driver;
  if (kind == "host") {
    // Host pages default to 2 MiB, the GPU granularity, so host runs exercise the same
    // page geometry as device runs.
    if (page_size == 0) page_size = size_t{2} << 20;
    driver = make_host_driver(device, page_size, host_capacity);
  } else if (kind == "cuda") {
    driver = make_cuda_driver(device);
  } else if (kind == "acl") {
    driver = make_acl_driver(device);
  } else {
    throw std::invalid_argument("unknown backend '" + kind + "' (expected host, cuda or acl)");
  }
  return std::make_unique<VmmHandle>(std::make_unique<Vmm>(std::move(driver), page_size));
}

ProbeResult probe(const std::string& kind) {
  if (kind == "host") return probe_host();
  if (kind == "cuda") return probe_cuda();
  if (kind == "acl") return probe_acl();
  throw std::invalid_argument("unknown backend '" + kind + "' (expected host, cuda or acl)");
}

py::dict stats_dict(const VmmStats& s) {
  py::dict d;
  d["pages"] = s.pages;
  d["mapped"] = s.mapped;
  d["reservations"] = s.reservations;
  d["reserved_bytes"] = s.reserved_bytes;
  d["resident_bytes"] = s.resident_bytes;
  d["map_calls"] = s.map_calls;
  d["unmap_calls"] = s.unmap_calls;
  d["pages_created"] = s.pages_created;
  d["pages_released"] = s.pages_released;
  return d;
}

}  // namespace
}  // namespace vmkv

PYBIND11_MODULE(_C, m) {
  using namespace vmkv;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "vmkv virtual-memory core: host (memfd), CUDA and AscendCL backends";

  g_driver_error = PyErr_NewExceptionWithDoc("vmkv.vmm_ops._C.DriverError",
                                             "A driver call failed; .name is the driver's error name.",
                                             PyExc_RuntimeError, nullptr);
  g_out_of_memory = PyErr_NewExceptionWithDoc("vmkv.vmm_ops._C.OutOfDeviceMemory",
                                              "The device has no physical memory left for the request.",
                                              g_driver_error, nullptr);
  m.add_object("DriverError", py::handle(g_driver_error));
  m.add_object("OutOfDeviceMemory", py::handle(g_out_of_memory));
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const DriverError& error) {
      PyObject* type = error.out_of_memory() ? g_out_of_memory : g_driver_error;
      py::object instance = py::reinterpret_steal<py::object>(PyObject_CallFunction(type, "s", error.what()));
      instance.attr("name") = error.name();
      instance.attr("code") = error.code();
      PyErr_SetObject(type, instance.ptr());
    }
  });

  py::class_<VmmHandle>(m, "Vmm")
      .def_property_readonly("kind", [](VmmHandle& h) { return std::string(h.get().kind()); })
      .def_property_readonly("device", [](VmmHandle& h) { return h.get().device(); })
      .def_property_readonly("page_size", [](VmmHandle& h) { return h.get().page_size(); })
      .def_property_readonly("closed", &VmmHandle::closed)
      .def("granularity", [](VmmHandle& h) { return h.get().granularity(); }, release_gil())
      .def("mem_info",
           [](VmmHandle& h) {
             MemInfo info = h.get().mem_info();
             return std::make_pair(info.free_bytes, info.total_bytes);
           },
           release_gil(), "(free_bytes, total_bytes) of the device")
      .def("reserve", [](VmmHandle& h, long long size) { return h.get().reserve(non_negative(size, "size")); },
           py::arg("size"), release_gil())
      .def("release_reservation", [](VmmHandle& h, uintptr_t va) { h.get().release_reservation(va); },
           py::arg("address"), release_gil())
      .def("create_pages",
           [](VmmHandle& h, long long count) { return h.get().create_pages(non_negative(count, "count")); },
           py::arg("count"), release_gil())
      .def("release_pages", [](VmmHandle& h, const std::vector<uint64_t>& pages) { h.get().release_pages(pages); },
           py::arg("pages"), release_gil())
      .def("map", [](VmmHandle& h, const std::vector<MapPair>& pairs) { h.get().map(pairs); }, py::arg("pairs"),
           release_gil(), "Map (address, page) pairs in one batch, all or nothing.")
      .def("unmap", [](VmmHandle& h, const std::vector<uintptr_t>& addresses) { return h.get().unmap(addresses); },
           py::arg("addresses"), release_gil(),
           "Unmap addresses in one batch, after the device's queued work; returns the pages that were there.")
      .def("mapped", [](VmmHandle& h, const std::vector<uintptr_t>& addresses) { return h.get().mapped(addresses); },
           py::arg("addresses"), "Whether each address has a page mapped (what a failed unmap batch left).")
      .def("synchronize", [](VmmHandle& h) { h.get().synchronize(); }, release_gil(),
           "Wait for the work already queued on the device (nothing to wait for on the host backend).")
      .def("register_host", [](VmmHandle& h, uintptr_t address, size_t size) { h.get().register_host(address, size); },
           py::arg("address"), py::arg("size"), release_gil(),
           "Page-lock host memory for fast asynchronous device copies (no-op on the host backend).")
      .def("unregister_host", [](VmmHandle& h, uintptr_t address) { h.get().unregister_host(address); },
           py::arg("address"), release_gil())
      .def("stats", [](VmmHandle& h) { return stats_dict(h.get().stats()); })
      .def("close", &VmmHandle::close, release_gil());

  m.def("open", &open_vmm, py::arg("kind"), py::arg("device") = 0, py::arg("page_size") = 0,
        py::arg("host_capacity") = 0, release_gil(),
        "Open a backend. page_size 0 means the granularity (host: 2 MiB); host_capacity 0 means all RAM.");
  m.def(
      "probe",
      [](const std::string& kind) {
        ProbeResult r;
        {
          py::gil_scoped_release release;
          r = probe(kind);
        }
        py::dict d;
        d["available"] = r.available;
        d["reason"] = r.reason;
        d["device_count"] = r.device_count;
        d["granularity"] = r.granularity;
        return d;
      },
      py::arg("kind"));
}
