// Ascend backend: the AscendCL VMM API (aclrtReserveMemAddress / aclrtMallocPhysical /
// aclrtMapMem), loaded from libascendcl.so at run time. Differences from CUDA that shape
// this file: a physical handle is always mapped whole (map size == physical size), unmap
// takes no size, and there is no set-access step. Types and constants follow CANN's
// acl_rt.h / acl_base_rt.h / rt_error_codes.h.
#include <cstdlib>
#include <mutex>
#include <string>

#include "driver.h"
#include "dynlib.h"

namespace vmkv {
namespace {

using aclError = int;
using aclrtContext = void*;
using aclrtDrvMemHandle = void*;

struct AclMemLocation {
  uint32_t id;
  int type;  // ACL_MEM_LOCATION_TYPE_DEVICE = 1
};

struct AclPhysicalMemProp {
  int handle_type;      // ACL_MEM_HANDLE_TYPE_NONE = 0
  int allocation_type;  // ACL_MEM_ALLOCATION_TYPE_PINNED = 0
  int mem_attr;         // ACL_HBM_MEM_HUGE = 4
  AclMemLocation location;
  uint64_t reserve;
};
static_assert(sizeof(AclPhysicalMemProp) == 32, "aclrtPhysicalMemProp is 32 bytes on LP64");

constexpr aclError kAclSuccess = 0;
constexpr aclError kAclRepeatInitialize = 100002;
constexpr int kAclHbmMemHuge = 4;
constexpr int kAclLocationDevice = 1;
constexpr int kAclGranularityMinimum = 0;
constexpr int kAclHostRegisterMapped = 0;  // aclrtHostRegisterType ACL_HOST_REGISTER_MAPPED

struct AclErrorName {
  aclError code;
  const char* name;
  bool out_of_memory;
};

constexpr AclErrorName kAclErrors[] = {
    {100000, "ACL_ERROR_INVALID_PARAM", false},
    {100001, "ACL_ERROR_UNINITIALIZE", false},
    {200000, "ACL_ERROR_BAD_ALLOC", true},
    {200001, "ACL_ERROR_API_NOT_SUPPORT", false},
    {200002, "ACL_ERROR_INVALID_DEVICE", false},
    {200003, "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED", false},
    {200005, "ACL_ERROR_INVALID_RESOURCE_HANDLE", false},
    {107000, "ACL_ERROR_RT_PARAM_INVALID", false},
    {107001, "ACL_ERROR_RT_INVALID_DEVICEID", false},
    {107002, "ACL_ERROR_RT_CONTEXT_NULL", false},
    {107008, "ACL_ERROR_RT_ADDR_UNALIGNED", false},
    {107017, "ACL_ERROR_RT_INVALID_HANDLE", false},
    {207000, "ACL_ERROR_RT_FEATURE_NOT_SUPPORT", false},
    {207001, "ACL_ERROR_RT_MEMORY_ALLOCATION", true},
    {207002, "ACL_ERROR_RT_MEMORY_FREE", false},
    {207004, "ACL_ERROR_RT_NO_DEVICE", false},
    {207005, "ACL_ERROR_RT_RESOURCE_ALLOC_FAIL", true},
    {207018, "ACL_ERROR_RT_DEVICE_OOM", true},
    {507000, "ACL_ERROR_RT_INTERNAL_ERROR", false},
    {507899, "ACL_ERROR_RT_DRV_INTERNAL_ERROR", false},
};

struct AclApi {
  aclError (*aclInit)(const char*);
  const char* (*aclGetRecentErrMsg)();
  aclError (*aclrtSetDevice)(int32_t);
  aclError (*aclrtGetDeviceCount)(uint32_t*);
  aclError (*aclrtGetCurrentContext)(aclrtContext*);
  aclError (*aclrtSetCurrentContext)(aclrtContext);
  aclError (*aclrtGetMemInfo)(int, size_t*, size_t*);
  aclError (*aclrtReserveMemAddress)(void**, size_t, size_t, void*, uint64_t);
  aclError (*aclrtReleaseMemAddress)(void*);
  aclError (*aclrtMallocPhysical)(aclrtDrvMemHandle*, size_t, const AclPhysicalMemProp*, uint64_t);
  aclError (*aclrtFreePhysical)(aclrtDrvMemHandle);
  aclError (*aclrtMapMem)(void*, size_t, size_t, aclrtDrvMemHandle, uint64_t);
  aclError (*aclrtUnmapMem)(void*);
  aclError (*aclrtSynchronizeDevice)();
  aclError (*aclrtMemGetAllocationGranularity)(AclPhysicalMemProp*, int, size_t*);
  aclError (*aclrtHostRegister)(void*, uint64_t, int, void**);
  aclError (*aclrtHostUnregister)(void*);

  DynamicLibrary library;
  std::string path;
  std::string error;
};

// VMKV_ACL_LIBRARY names the library directly; otherwise it is found under the CANN
// toolkit root, $ASCEND_HOME_PATH/lib64.
std::string acl_library_path(std::string* why_missing) {
  if (const char* explicit_path = std::getenv("VMKV_ACL_LIBRARY"); explicit_path != nullptr && *explicit_path) {
    return explicit_path;
  }
  if (const char* home = std::getenv("ASCEND_HOME_PATH"); home != nullptr && *home) {
    return std::string(home) + "/lib64/libascendcl.so";
  }
  *why_missing = "neither VMKV_ACL_LIBRARY nor ASCEND_HOME_PATH is set";
  return "";
}

const AclErrorName* find_error(aclError code) {
  for (const AclErrorName& entry : kAclErrors) {
    if (entry.code == code) return &entry;
  }
  return nullptr;
}

AclApi& acl_api() {
  static AclApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    api.path = acl_library_path(&api.error);
    if (api.path.empty()) return;
    DynamicLibrary& lib = api.library;
    bool ok = lib.open(api.path) && lib.resolve("aclInit", api.aclInit) &&
              lib.resolve("aclGetRecentErrMsg", api.aclGetRecentErrMsg) &&
              lib.resolve("aclrtSetDevice", api.aclrtSetDevice) &&
              lib.resolve("aclrtGetDeviceCount", api.aclrtGetDeviceCount) &&
              lib.resolve("aclrtGetCurrentContext", api.aclrtGetCurrentContext) &&
              lib.resolve("aclrtSetCurrentContext", api.aclrtSetCurrentContext) &&
              lib.resolve("aclrtGetMemInfo", api.aclrtGetMemInfo) &&
              lib.resolve("aclrtReserveMemAddress", api.aclrtReserveMemAddress) &&
              lib.resolve("aclrtReleaseMemAddress", api.aclrtReleaseMemAddress) &&
              lib.resolve("aclrtMallocPhysical", api.aclrtMallocPhysical) &&
              lib.resolve("aclrtFreePhysical", api.aclrtFreePhysical) &&
              lib.resolve("aclrtMapMem", api.aclrtMapMem) && lib.resolve("aclrtUnmapMem", api.aclrtUnmapMem) &&
              lib.resolve("aclrtSynchronizeDevice", api.aclrtSynchronizeDevice) &&
              lib.resolve("aclrtMemGetAllocationGranularity", api.aclrtMemGetAllocationGranularity) &&
              lib.resolve("aclrtHostRegister", api.aclrtHostRegister) &&
              lib.resolve("aclrtHostUnregister", api.aclrtHostUnregister);
    if (!ok) {
      api.error = lib.error();
      return;
    }
    aclError rc = api.aclInit(nullptr);
    if (rc != kAclSuccess && rc != kAclRepeatInitialize) {
      api.error = "aclInit failed with error " + std::to_string(rc);
    }
  });
  return api;
}

void check(aclError rc, const char* call) {
  if (rc == kAclSuccess) return;
  const AclErrorName* known = find_error(rc);
  const char* detail = acl_api().aclGetRecentErrMsg();
  std::string message = std::string(call) + " failed";
  if (detail != nullptr && *detail) message += ": " + std::string(detail);
  throw DriverError(known != nullptr ? known->name : "ACL_ERROR_" + std::to_string(rc), rc, message,
                    known != nullptr && known->out_of_memory);
}

AclApi& usable_api() {
  AclApi& api = acl_api();
  if (!api.error.empty()) throw DriverError("ACL_UNAVAILABLE", -1, api.error, false);
  return api;
}

AclPhysicalMemProp device_prop(int device) {
  AclPhysicalMemProp prop{};
  prop.mem_attr = kAclHbmMemHuge;
  prop.location.id = static_cast<uint32_t>(device);
  prop.location.type = kAclLocationDevice;
  return prop;
}

class AclDriver final : public Driver {
 public:
  explicit AclDriver(int device) : api_(usable_api()), device_(device), prop_(device_prop(device)) {
    check(api_.aclrtSetDevice(device), "aclrtSetDevice");
    check(api_.aclrtGetCurrentContext(&context_), "aclrtGetCurrentContext");
  }

  const char* kind() const override { return "acl"; }
  int device() const override { return device_; }

  size_t granularity() override {
    size_t granularity = 0;
    check(api_.aclrtMemGetAllocationGranularity(&prop_, kAclGranularityMinimum, &granularity),
          "aclrtMemGetAllocationGranularity");
    return granularity;
  }

  MemInfo mem_info() override {
    bind();
    MemInfo info;
    check(api_.aclrtGetMemInfo(kAclHbmMemHuge, &info.free_bytes, &info.total_bytes), "aclrtGetMemInfo");
    return info;
  }

  uintptr_t reserve(size_t size, size_t /*alignment*/) override {
    bind();
    void* ptr = nullptr;
    check(api_.aclrtReserveMemAddress(&ptr, size, 0, nullptr, 0), "aclrtReserveMemAddress");
    return reinterpret_cast<uintptr_t>(ptr);
  }

  void free_reservation(uintptr_t va, size_t /*size*/) override {
    bind();
    check(api_.aclrtReleaseMemAddress(reinterpret_cast<void*>(va)), "aclrtReleaseMemAddress");
  }

  NativeHandle create(size_t size) override {
    bind();
    aclrtDrvMemHandle handle = nullptr;
    check(api_.aclrtMallocPhysical(&handle, size, &prop_, 0), "aclrtMallocPhysical");
    return reinterpret_cast<NativeHandle>(handle);
  }

  void release(NativeHandle handle) override {
    bind();
    check(api_.aclrtFreePhysical(reinterpret_cast<aclrtDrvMemHandle>(handle)), "aclrtFreePhysical");
  }

  void map(uintptr_t va, size_t size, NativeHandle handle) override {
    bind();
    check(api_.aclrtMapMem(reinterpret_cast<void*>(va), size, 0, reinterpret_cast<aclrtDrvMemHandle>(handle), 0),
          "aclrtMapMem");
  }

  void unmap(uintptr_t va, size_t /*size*/) override {
    bind();
    check(api_.aclrtUnmapMem(reinterpret_cast<void*>(va)), "aclrtUnmapMem");
  }

  void quiesce() override {
    bind();
    check(api_.aclrtSynchronizeDevice(), "aclrtSynchronizeDevice");
  }

  // ACL_HOST_REGISTER_MAPPED: the device may read and write the range. The device-side
  // alias it returns is not needed: copies take the host address.
  void register_host(uintptr_t address, size_t size) override {
    bind();
    void* device_alias = nullptr;
    check(api_.aclrtHostRegister(reinterpret_cast<void*>(address), size, kAclHostRegisterMapped, &device_alias),
          "aclrtHostRegister");
  }

  void unregister_host(uintptr_t address) override {
    bind();
    check(api_.aclrtHostUnregister(reinterpret_cast<void*>(address)), "aclrtHostUnregister");
  }

 private:
  // ACL contexts are per thread; calls may come from any Python thread.
  void bind() { check(api_.aclrtSetCurrentContext(context_), "aclrtSetCurrentContext"); }

  AclApi& api_;
  int device_;
  AclPhysicalMemProp prop_;
  aclrtContext context_ = nullptr;
};

}  // namespace

std::unique_ptr<Driver> make_acl_driver(int device) {
  AclApi& api = usable_api();
  uint32_t count = 0;
  check(api.aclrtGetDeviceCount(&count), "aclrtGetDeviceCount");
  if (device < 0 || static_cast<uint32_t>(device) >= count) {
    throw std::invalid_argument("Ascend device " + std::to_string(device) + " does not exist (" +
                                std::to_string(count) + " devices)");
  }
  return std::make_unique<AclDriver>(device);
}

ProbeResult probe_acl() {
  ProbeResult result;
  AclApi& api = acl_api();
  if (!api.error.empty()) {
    result.reason = api.error;
    return result;
  }
  uint32_t count = 0;
  if (api.aclrtGetDeviceCount(&count) != kAclSuccess || count == 0) {
    result.reason = "no Ascend devices";
    return result;
  }
  AclPhysicalMemProp prop = device_prop(0);
  size_t granularity = 0;
  if (api.aclrtMemGetAllocationGranularity(&prop, kAclGranularityMinimum, &granularity) != kAclSuccess) {
    result.reason = "aclrtMemGetAllocationGranularity failed on device 0";
    return result;
  }
  result.available = true;
  result.device_count = static_cast<int>(count);
  result.granularity = granularity;
  return result;
}

}  // namespace vmkv
