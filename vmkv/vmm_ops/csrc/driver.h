// The one interface every memory backend implements.
//
// A Driver wraps the primitive calls of one virtual-memory API (host memfd, CUDA driver,
// AscendCL). It does no bookkeeping: validation, batching, rollback and ownership tracking
// live in Vmm (vmm.h), so the three backends stay small and cannot disagree on semantics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace vmkv {

// An error reported by the underlying driver. `name` is the driver's own error name
// (CUDA_ERROR_OUT_OF_MEMORY, ACL_ERROR_RT_MEMORY_ALLOCATION, ENOMEM, ...).
class DriverError : public std::runtime_error {
 public:
  DriverError(std::string name, long code, const std::string& what, bool out_of_memory)
      : std::runtime_error(name + ": " + what),
        name_(std::move(name)),
        code_(code),
        out_of_memory_(out_of_memory) {}
  const std::string& name() const { return name_; }
  long code() const { return code_; }
  bool out_of_memory() const { return out_of_memory_; }

 private:
  std::string name_;
  long code_;
  bool out_of_memory_;
};

// Whether a backend can run on this machine, and why not when it cannot.
struct ProbeResult {
  bool available = false;
  std::string reason;      // empty when available
  int device_count = 0;
  size_t granularity = 0;  // of device 0; 0 when unavailable
};

struct MemInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

// Opaque per-backend handle of one physical page (CUmemGenericAllocationHandle,
// aclrtDrvMemHandle, or a memfd offset on the host).
using NativeHandle = uint64_t;

class Driver {
 public:
  virtual ~Driver() = default;
  virtual const char* kind() const = 0;
  virtual int device() const = 0;
  virtual size_t granularity() = 0;
  virtual MemInfo mem_info() = 0;
  virtual uintptr_t reserve(size_t size, size_t alignment) = 0;
  virtual void free_reservation(uintptr_t va, size_t size) = 0;
  virtual NativeHandle create(size_t size) = 0;
  virtual void release(NativeHandle handle) = 0;
  virtual void map(uintptr_t va, size_t size, NativeHandle handle) = 0;
  virtual void unmap(uintptr_t va, size_t size) = 0;
  // Wait until the work already queued on the device is done. Neither cuMemUnmap nor
  // aclrtUnmapMem waits for kernels in flight that still read or write the range, so Vmm
  // calls this once before each unmap batch: an engine that frees a block while its last
  // step is still running (asynchronous scheduling, preemption) must not fault.
  virtual void quiesce() {}
  // Grant read/write access to a contiguous, freshly mapped range. Only CUDA needs it.
  // Vmm calls it once per contiguous run of a batch, the fewest calls the API allows;
  // the driver still does its work per mapped handle (~25 us each on an H100, see
  // benchmarks/cuda_vmm_probe.cpp), so this saves call overhead, not that work.
  virtual void set_access(uintptr_t /*va*/, size_t /*size*/) {}
  // Page-lock host memory so copies between it and the device run asynchronously at full
  // speed (the spill tier's shared slots). Host memory needs nothing on the host backend.
  virtual void register_host(uintptr_t /*address*/, size_t /*size*/) {}
  virtual void unregister_host(uintptr_t /*address*/) {}
  // Backend-specific counters for stats() (e.g. bytes the host memfd really holds).
  virtual size_t resident_bytes() { return 0; }
};

// Factories and probes, one pair per backend file.
std::unique_ptr<Driver> make_host_driver(int device, size_t page_size, size_t capacity_bytes);
std::unique_ptr<Driver> make_cuda_driver(int device);
std::unique_ptr<Driver> make_acl_driver(int device);
ProbeResult probe_host();
ProbeResult probe_cuda();
ProbeResult probe_acl();

}  // namespace vmkv
