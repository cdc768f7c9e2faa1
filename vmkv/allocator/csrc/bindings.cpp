// Python bindings of the block book. Calls are sub-microsecond and made under the
// allocator's lock, so the GIL stays held. Ids cross as Python ints; anything else is a
// ValueError naming it, as a bad id is.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "block_book.h"

namespace py = pybind11;
using vmkv::alloc::BlockBook;

namespace {

// Python ints to int64, bools refused. A list is read without the iterator protocol:
// vLLM returns blocks one request at a time, so this runs for every freed block list.
std::vector<int64_t> ids(const py::handle& items, const char* what) {
  std::vector<int64_t> out;
  auto convert = [&](PyObject* item) {
    if (!PyLong_Check(item) || PyBool_Check(item))
      throw std::invalid_argument(std::string(what) + " " + py::repr(item).cast<std::string>() +
                                  " is not an integer");
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0)
      throw std::invalid_argument(std::string(what) + " " + py::repr(item).cast<std::string>() + " is out of range");
    out.push_back(value);
  };
  if (PyList_CheckExact(items.ptr())) {
    const Py_ssize_t size = PyList_GET_SIZE(items.ptr());
    out.reserve(static_cast<size_t>(size));
    for (Py_ssize_t i = 0; i < size; ++i) convert(PyList_GET_ITEM(items.ptr(), i));
  } else {
    for (const py::handle& item : py::iter(items)) convert(item.ptr());
  }
  return out;
}

py::list as_list(const std::vector<int64_t>& values) {
  py::list out(values.size());
  for (size_t i = 0; i < values.size(); ++i) PyList_SET_ITEM(out.ptr(), i, PyLong_FromLongLong(values[i]));
  return out;
}

}  // namespace

PYBIND11_MODULE(_book, m) {
  m.doc() = "vmkv block allocator: which blocks of which mapped KV pages are free (best fit)";
  py::class_<BlockBook>(m, "BlockBook", "Block bookkeeping over mapped KV pages; block 0 is the null block.")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("blocks_per_page"))
      .def_property_readonly("num_blocks", &BlockBook::num_blocks)
      .def_property_readonly("blocks_per_page", &BlockBook::blocks_per_page)
      .def_property_readonly("num_pages", &BlockBook::num_pages)
      .def_property_readonly("free_mapped", &BlockBook::free_mapped)
      .def_property_readonly("used", &BlockBook::used)
      .def_property_readonly("mapped_pages", &BlockBook::mapped_pages)
      .def_property_readonly("num_empty", &BlockBook::num_empty)
      .def("page_size", &BlockBook::page_size, py::arg("page"))
      .def("is_mapped", &BlockBook::is_mapped, py::arg("page"))
      .def("is_allocated", &BlockBook::is_allocated, py::arg("block"))
      .def("live_blocks", &BlockBook::live_blocks, py::arg("page"))
      .def("empty_pages", [](const BlockBook& book) { return as_list(book.empty_pages()); })
      .def(
          "take", [](BlockBook& book, int64_t count) { return as_list(book.take(count)); }, py::arg("count"),
          "`count` free blocks (at most free_mapped), fullest page first.")
      .def(
          "put", [](BlockBook& book, const py::handle& blocks) { book.put(ids(blocks, "block id")); },
          py::arg("blocks"), "Free allocated blocks; ValueError naming the first bad one, nothing changed.")
      .def(
          "add_pages", [](BlockBook& book, const py::handle& pages) { book.add_pages(ids(pages, "KV page")); },
          py::arg("pages"))
      .def(
          "retire_empty", [](BlockBook& book, int64_t keep) { return as_list(book.retire_empty(keep)); },
          py::arg("keep"))
      .def(
          "take_whole", [](BlockBook& book, const py::handle& pages) { book.take_whole(ids(pages, "KV page")); },
          py::arg("pages"))
      .def(
          "put_whole", [](BlockBook& book, const py::handle& pages) { book.put_whole(ids(pages, "KV page")); },
          py::arg("pages"))
      .def(
          "pages_only_holding",
          [](const BlockBook& book, const py::handle& blocks) {
            py::dict out;
            for (const auto& [page, held] : book.pages_only_holding(ids(blocks, "block id")))
              out[py::int_(page)] = as_list(held);
            return out;
          },
          py::arg("blocks"));
}
