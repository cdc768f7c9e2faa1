// CUDA backend: the driver VMM API (cuMemAddressReserve / cuMemCreate / cuMemMap /
// cuMemSetAccess), loaded from libcuda.so.1 at run time so that the module imports on
// machines with no driver. The handful of driver types it needs are declared here with
// the driver's ABI; when cuda.h is on the include path they are checked against it.
#include <mutex>
#include <string>

#include "driver.h"
#include "dynlib.h"

namespace vmkv {
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUdeviceptr = unsigned long long;
using CUmemHandle = unsigned long long;

struct CuMemLocation {
  int type;  // CU_MEM_LOCATION_TYPE_DEVICE = 1
  int id;
};

struct CuMemAllocationProp {
  int type;                   // CU_MEM_ALLOCATION_TYPE_PINNED = 1
  int requested_handle_types; // CU_MEM_HANDLE_TYPE_NONE = 0
  CuMemLocation location;
  void* win32_handle_meta_data;
  struct {
    unsigned char compression_type;
    unsigned char gpu_direct_rdma_capable;
    unsigned short usage;
    unsigned char reserved[4];
  } alloc_flags;
};

struct CuMemAccessDesc {
  CuMemLocation location;
  int flags;  // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
};

constexpr int kLocationTypeDevice = 1;
constexpr int kAllocationTypePinned = 1;
constexpr int kAccessReadWrite = 3;
constexpr int kGranularityMinimum = 0;
constexpr unsigned int kCuMemHostRegisterPortable = 1;
constexpr CUresult kSuccess = 0;
constexpr CUresult kOutOfMemory = 2;


// The driver entry points, resolved once per process. libcuda stays loaded for the
// life of the process: unloading a driver under live contexts is never safe.
struct CudaApi {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuCtxSynchronize)();
  CUresult (*cuMemGetInfo)(size_t*, size_t*);
  CUresult (*cuMemGetAllocationGranularity)(size_t*, const CuMemAllocationProp*, int);
  CUresult (*cuMemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
  CUresult (*cuMemCreate)(CUmemHandle*, size_t, const CuMemAllocationProp*, unsigned long long);
  CUresult (*cuMemRelease)(CUmemHandle);
  CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemHandle, unsigned long long);
  CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
  CUresult (*cuMemHostRegister)(void*, size_t, unsigned int);
  CUresult (*cuMemHostUnregister)(void*);
  CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CuMemAccessDesc*, size_t);

  DynamicLibrary library;
  std::string error;  // why the API is unusable; empty when usable
};

CudaApi& cuda_api() {
  static CudaApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    DynamicLibrary& lib = api.library;
    bool ok = lib.open("libcuda.so.1") && lib.resolve("cuInit", api.cuInit) &&
              lib.resolve("cuGetErrorName", api.cuGetErrorName) &&
              lib.resolve("cuGetErrorString", api.cuGetErrorString) &&
              lib.resolve("cuDeviceGetCount", api.cuDeviceGetCount) && lib.resolve("cuDeviceGet", api.cuDeviceGet) &&
              lib.resolve("cuDevicePrimaryCtxRetain", api.cuDevicePrimaryCtxRetain) &&
              lib.resolve("cuDevicePrimaryCtxRelease_v2", api.cuDevicePrimaryCtxRelease) &&
              lib.resolve("cuCtxPushCurrent_v2", api.cuCtxPushCurrent) &&
              lib.resolve("cuCtxPopCurrent_v2", api.cuCtxPopCurrent) &&
              lib.resolve("cuCtxSynchronize", api.cuCtxSynchronize) &&
              lib.resolve("cuMemGetInfo_v2", api.cuMemGetInfo) &&
              lib.resolve("cuMemGetAllocationGranularity", api.cuMemGetAllocationGranularity) &&
              lib.resolve("cuMemAddressReserve", api.cuMemAddressReserve) &&
              lib.resolve("cuMemAddressFree", api.cuMemAddressFree) && lib.resolve("cuMemCreate", api.cuMemCreate) &&
              lib.resolve("cuMemRelease", api.cuMemRelease) && lib.resolve("cuMemMap", api.cuMemMap) &&
              lib.resolve("cuMemUnmap", api.cuMemUnmap) && lib.resolve("cuMemSetAccess", api.cuMemSetAccess) &&
              lib.resolve("cuMemHostRegister_v2", api.cuMemHostRegister) &&
              lib.resolve("cuMemHostUnregister", api.cuMemHostUnregister);
    if (!ok) {
      api.error = lib.error();
      return;
    }
    CUresult rc = api.cuInit(0);
    if (rc != kSuccess) {
      const char* name = nullptr;
      api.cuGetErrorName(rc, &name);
      api.error = std::string("cuInit failed: ") + (name != nullptr ? name : std::to_string(rc));
    }
  });
  return api;
}

void check(CUresult rc, const char* call) {
  if (rc == kSuccess) return;
  CudaApi& api = cuda_api();
  const char* name = nullptr;
  const char* text = nullptr;
  api.cuGetErrorName(rc, &name);
  api.cuGetErrorString(rc, &text);
  throw DriverError(name != nullptr ? name : "CUDA_ERROR_UNKNOWN", rc,
                    std::string(call) + " failed: " + (text != nullptr ? text : "unknown error"),
                    rc == kOutOfMemory);
}

CudaApi& usable_api() {
  CudaApi& api = cuda_api();
  if (!api.error.empty()) throw DriverError("CUDA_UNAVAILABLE", -1, api.error, false);
  return api;
}

CuMemAllocationProp device_prop(int device) {
  CuMemAllocationProp prop{};
  prop.type = kAllocationTypePinned;
  prop.location.type = kLocationTypeDevice;
  prop.location.id = device;
  return prop;
}

class CudaDriver final : public Driver {
 public:
  explicit CudaDriver(int device) : api_(usable_api()), device_(device), prop_(device_prop(device)) {
    check(api_.cuDeviceGet(&cu_device_, device), "cuDeviceGet");
    check(api_.cuDevicePrimaryCtxRetain(&context_, cu_device_), "cuDevicePrimaryCtxRetain");
    access_.location = prop_.location;
    access_.flags = kAccessReadWrite;
  }
  ~CudaDriver() override { api_.cuDevicePrimaryCtxRelease(cu_device_); }

  const char* kind() const override { return "cuda"; }
  int device() const override { return device_; }

  size_t granularity() override {
    size_t granularity = 0;
    check(api_.cuMemGetAllocationGranularity(&granularity, &prop_, kGranularityMinimum),
          "cuMemGetAllocationGranularity");
    return granularity;
  }

  MemInfo mem_info() override {
    ContextScope scope(*this);
    MemInfo info;
    check(api_.cuMemGetInfo(&info.free_bytes, &info.total_bytes), "cuMemGetInfo");
    return info;
  }

  uintptr_t reserve(size_t size, size_t alignment) override {
    ContextScope scope(*this);
    CUdeviceptr ptr = 0;
    check(api_.cuMemAddressReserve(&ptr, size, alignment, 0, 0), "cuMemAddressReserve");
    return static_cast<uintptr_t>(ptr);
  }

  void free_reservation(uintptr_t va, size_t size) override {
    ContextScope scope(*this);
    check(api_.cuMemAddressFree(va, size), "cuMemAddressFree");
  }

  NativeHandle create(size_t size) override {
    ContextScope scope(*this);
    CUmemHandle handle = 0;
    check(api_.cuMemCreate(&handle, size, &prop_, 0), "cuMemCreate");
    return handle;
  }

  void release(NativeHandle handle) override {
    ContextScope scope(*this);
    check(api_.cuMemRelease(handle), "cuMemRelease");
  }

  void map(uintptr_t va, size_t size, NativeHandle handle) override {
    ContextScope scope(*this);
    check(api_.cuMemMap(va, size, 0, handle, 0), "cuMemMap");
  }

  void unmap(uintptr_t va, size_t size) override {
    ContextScope scope(*this);
    check(api_.cuMemUnmap(va, size), "cuMemUnmap");
  }

  void quiesce() override {
    ContextScope scope(*this);
    check(api_.cuCtxSynchronize(), "cuCtxSynchronize");
  }

  void set_access(uintptr_t va, size_t size) override {
    ContextScope scope(*this);
    check(api_.cuMemSetAccess(va, size, &access_, 1), "cuMemSetAccess");
  }

  // PORTABLE: pinned for every context, so other devices' copies are fast as well.
  void register_host(uintptr_t address, size_t size) override {
    ContextScope scope(*this);
    check(api_.cuMemHostRegister(reinterpret_cast<void*>(address), size, kCuMemHostRegisterPortable),
          "cuMemHostRegister");
  }

  void unregister_host(uintptr_t address) override {
    ContextScope scope(*this);
    check(api_.cuMemHostUnregister(reinterpret_cast<void*>(address)), "cuMemHostUnregister");
  }

 private:
  // Makes the device's primary context current for one call and restores the caller's
  // afterwards, so vmkv never changes what torch considers the current device.
  class ContextScope {
   public:
    explicit ContextScope(CudaDriver& driver) : api_(driver.api_) {
      check(api_.cuCtxPushCurrent(driver.context_), "cuCtxPushCurrent");
    }
    ~ContextScope() {
      CUcontext popped = nullptr;
      api_.cuCtxPopCurrent(&popped);
    }

   private:
    CudaApi& api_;
  };

  CudaApi& api_;
  int device_;
  CUdevice cu_device_ = 0;
  CUcontext context_ = nullptr;
  CuMemAllocationProp prop_;
  CuMemAccessDesc access_{};
};

}  // namespace

std::unique_ptr<Driver> make_cuda_driver(int device) {
  CudaApi& api = usable_api();
  int count = 0;
  check(api.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (device < 0 || device >= count) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(count) + " devices)");
  }
  return std::make_unique<CudaDriver>(device);
}

ProbeResult probe_cuda() {
  ProbeResult result;
  CudaApi& api = cuda_api();
  if (!api.error.empty()) {
    result.reason = api.error;
    return result;
  }
  int count = 0;
  CUresult rc = api.cuDeviceGetCount(&count);
  if (rc != kSuccess || count == 0) {
    result.reason = rc != kSuccess ? "cuDeviceGetCount failed" : "no CUDA devices";
    return result;
  }
  CuMemAllocationProp prop = device_prop(0);
  size_t granularity = 0;
  if (api.cuMemGetAllocationGranularity(&granularity, &prop, kGranularityMinimum) != kSuccess) {
    result.reason = "device 0 does not support virtual memory management";
    return result;
  }
  result.available = true;
  result.device_count = count;
  result.granularity = granularity;
  return result;
}

}  // namespace vmkv

// Our ABI declarations must agree with the real header wherever it is available. It is
// included last so that its function-renaming macros cannot touch the code above.
#if __has_include(<cuda.h>)
#include <cuda.h>
#include <cstddef>
static_assert(sizeof(vmkv::CuMemAllocationProp) == sizeof(CUmemAllocationProp), "CUmemAllocationProp ABI");
static_assert(offsetof(vmkv::CuMemAllocationProp, location) == offsetof(CUmemAllocationProp, location), "ABI");
static_assert(offsetof(vmkv::CuMemAllocationProp, alloc_flags) == offsetof(CUmemAllocationProp, allocFlags), "ABI");
static_assert(sizeof(vmkv::CuMemAccessDesc) == sizeof(CUmemAccessDesc), "CUmemAccessDesc ABI");
static_assert(vmkv::kLocationTypeDevice == CU_MEM_LOCATION_TYPE_DEVICE, "ABI");
static_assert(vmkv::kAllocationTypePinned == CU_MEM_ALLOCATION_TYPE_PINNED, "ABI");
static_assert(vmkv::kAccessReadWrite == CU_MEM_ACCESS_FLAGS_PROT_READWRITE, "ABI");
static_assert(vmkv::kGranularityMinimum == CU_MEM_ALLOC_GRANULARITY_MINIMUM, "ABI");
static_assert(vmkv::kOutOfMemory == CUDA_ERROR_OUT_OF_MEMORY, "ABI");
static_assert(vmkv::kCuMemHostRegisterPortable == CU_MEMHOSTREGISTER_PORTABLE, "ABI");
#endif
