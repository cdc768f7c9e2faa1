// Run-time loading of driver libraries, so the extension builds and imports on machines
// that have no GPU/NPU driver; the backend then reports why it is unavailable.
#pragma once

#include <dlfcn.h>

#include <string>

namespace vmkv {

class DynamicLibrary {
 public:
  DynamicLibrary() = default;
  DynamicLibrary(const DynamicLibrary&) = delete;
  DynamicLibrary& operator=(const DynamicLibrary&) = delete;
  ~DynamicLibrary() {
    if (handle_ != nullptr) dlclose(handle_);
  }

  // Returns false and fills error() when the library cannot be opened.
  bool open(const std::string& path) {
    handle_ = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) {
      const char* message = dlerror();
      error_ = message != nullptr ? message : ("cannot open " + path);
      return false;
    }
    return true;
  }

  // Resolves `name` into `fn`; returns false and fills error() when it is missing.
  template <typename Fn>
  bool resolve(const char* name, Fn& fn) {
    fn = reinterpret_cast<Fn>(dlsym(handle_, name));
    if (fn == nullptr) {
      error_ = std::string("symbol ") + name + " not found";
      return false;
    }
    return true;
  }

  const std::string& error() const { return error_; }

 private:
  void* handle_ = nullptr;
  std::string error_;
};

}  // namespace vmkv
