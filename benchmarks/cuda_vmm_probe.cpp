// Where the CUDA driver's VMM time goes, measured with raw driver calls and no vmkv.
//
// bench_vmm shows vmkv's batched map at the pooled floor (cuMemMap + cuMemSetAccess),
// and that floor at ~30 us per physical handle however the batch is shaped. This probe
// tries the remaining ways to make the driver's per-handle work cheaper: one grant per
// page or per run, shareable (POSIX fd) handles, a 1 GiB-aligned reservation, several
// threads mapping disjoint runs at once, larger handles, re-mapping the same handle at the
// same address, and mapping part of a larger handle. It also measures kvcached's naive
// path (create + map + access per page) beside the pooled one, on an idle device, with
// 40 GiB held by another tenant, and while a stream keeps the device busy.
//
// Build and run (scripts/gpu_check.sh does both):
//   g++ -O2 -std=c++17 -I/usr/local/cuda/include benchmarks/cuda_vmm_probe.cpp
//       -L/usr/local/cuda/lib64/stubs -lcuda -lpthread -o /tmp/cuda_vmm_probe
//   /tmp/cuda_vmm_probe [pages=64] [repeats=15]
// Prints one line per variant (medians, us per page) and a JSON line last.
#include <cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#define CK(x)                                                                  \
  do {                                                                         \
    CUresult r = (x);                                                          \
    if (r != CUDA_SUCCESS) {                                                   \
      const char* n;                                                           \
      cuGetErrorName(r, &n);                                                   \
      std::fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #x, n);     \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

static double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static CUcontext g_ctx;
static size_t g_page;
static std::string g_json;  // the variants' results, one object each

struct Variant {
  const char* name;
  int threads;
  CUmemAllocationHandleType handle_type;
  size_t align;
  bool access_per_page;
};

static CUmemAllocationProp device_prop() {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = 0;
  return prop;
}

static CUmemAccessDesc read_write(const CUmemAllocationProp& prop) {
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return access;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

static void run(const Variant& v, int pages, int repeats) {
  CUmemAllocationProp prop = device_prop();
  prop.requestedHandleTypes = v.handle_type;
  CUmemAccessDesc access = read_write(prop);
  std::vector<CUmemGenericAllocationHandle> handles(pages);
  for (auto& h : handles) CK(cuMemCreate(&h, g_page, &prop, 0));
  CUdeviceptr base;
  CK(cuMemAddressReserve(&base, g_page * pages, v.align, 0, 0));
  std::vector<double> map_us, unmap_us;
  for (int rep = 0; rep < repeats; ++rep) {
    auto map_part = [&](int lo, int hi) {
      CK(cuCtxSetCurrent(g_ctx));
      for (int i = lo; i < hi; ++i) CK(cuMemMap(base + i * g_page, g_page, 0, handles[i], 0));
      if (v.access_per_page) {
        for (int i = lo; i < hi; ++i) CK(cuMemSetAccess(base + i * g_page, g_page, &access, 1));
      } else {
        CK(cuMemSetAccess(base + lo * g_page, (hi - lo) * g_page, &access, 1));
      }
    };
    auto unmap_part = [&](int lo, int hi) {
      CK(cuCtxSetCurrent(g_ctx));
      CK(cuMemUnmap(base + lo * g_page, (hi - lo) * g_page));
    };
    auto fan = [&](auto&& part) {
      if (v.threads == 1) {
        part(0, pages);
        return;
      }
      std::vector<std::thread> ts;
      int per = pages / v.threads;
      for (int t = 0; t < v.threads; ++t) ts.emplace_back(part, t * per, t == v.threads - 1 ? pages : (t + 1) * per);
      for (auto& t : ts) t.join();
    };
    double t0 = now_us();
    fan(map_part);
    double t1 = now_us();
    CK(cuMemsetD8(base, rep & 0xff, g_page * pages));
    CK(cuCtxSynchronize());
    double t2 = now_us();
    fan(unmap_part);
    double t3 = now_us();
    map_us.push_back((t1 - t0) / pages);
    unmap_us.push_back((t3 - t2) / pages);
  }
  CK(cuMemAddressFree(base, g_page * pages));
  for (auto h : handles) CK(cuMemRelease(h));
  std::printf("%-28s pages=%3d page=%zuMiB threads=%2d map+access %7.2f us/page  unmap %7.2f us/page\n", v.name,
              pages, g_page >> 20, v.threads, median(map_us), median(unmap_us));
  char entry[256];
  std::snprintf(entry, sizeof entry,
                "%s{\"variant\": \"%s\", \"page_mib\": %zu, \"threads\": %d, \"map_access_us\": %.2f, "
                "\"unmap_us\": %.2f}",
                g_json.empty() ? "" : ", ", v.name, g_page >> 20, v.threads, median(map_us), median(unmap_us));
  g_json += entry;
  std::fflush(stdout);
}

// Does access survive an unmap and re-map of the same handle at the same address?
static void probe_access_after_remap() {
  CUmemAllocationProp prop = device_prop();
  CUmemAccessDesc access = read_write(prop);
  CUmemGenericAllocationHandle h;
  CK(cuMemCreate(&h, g_page, &prop, 0));
  CUdeviceptr base;
  CK(cuMemAddressReserve(&base, g_page, 0, 0, 0));
  CK(cuMemMap(base, g_page, 0, h, 0));
  CK(cuMemSetAccess(base, g_page, &access, 1));
  CK(cuMemUnmap(base, g_page));
  CK(cuMemMap(base, g_page, 0, h, 0));
  double t0 = now_us();
  CK(cuMemSetAccess(base, g_page, &access, 1));
  double t1 = now_us();
  std::printf("re-map of the same handle at the same address: set-access %.2f us\n", t1 - t0);
  char entry[128];
  std::snprintf(entry, sizeof entry, ", {\"variant\": \"re-map same handle, same address\", \"access_us\": %.2f}",
                t1 - t0);
  g_json += entry;
  // Partial mapping: a handle of 2 pages mapped with size of 1 page.
  CUmemGenericAllocationHandle big;
  CK(cuMemCreate(&big, 2 * g_page, &prop, 0));
  CUdeviceptr b2;
  CK(cuMemAddressReserve(&b2, 2 * g_page, 0, 0, 0));
  CUresult r = cuMemMap(b2, g_page, 0, big, 0);
  const char* n;
  cuGetErrorName(r, &n);
  std::printf("partial map (size < handle size): %s\n", n);
  g_json += std::string(", {\"variant\": \"partial map of a 2-page handle\", \"result\": \"") + n + "\"}";
  if (r == CUDA_SUCCESS) CK(cuMemUnmap(b2, g_page));
  CK(cuMemAddressFree(b2, 2 * g_page));
  CK(cuMemRelease(big));
  CK(cuMemUnmap(base, g_page));
  CK(cuMemAddressFree(base, g_page));
  CK(cuMemRelease(h));
}

// kvcached's path: a cuMemCreate, cuMemMap and cuMemSetAccess per page, and a cuMemUnmap
// and cuMemRelease per page to give it back.
static void run_naive(const char* state, int pages, int repeats) {
  CUmemAllocationProp prop = device_prop();
  CUmemAccessDesc access = read_write(prop);
  CUdeviceptr base;
  CK(cuMemAddressReserve(&base, g_page * pages, 0, 0, 0));
  std::vector<CUmemGenericAllocationHandle> handles(pages);
  std::vector<double> map_us, unmap_us;
  for (int rep = 0; rep < repeats; ++rep) {
    double t0 = now_us();
    for (int i = 0; i < pages; ++i) {
      CK(cuMemCreate(&handles[i], g_page, &prop, 0));
      CK(cuMemMap(base + i * g_page, g_page, 0, handles[i], 0));
      CK(cuMemSetAccess(base + i * g_page, g_page, &access, 1));
    }
    double t1 = now_us();
    for (int i = 0; i < pages; ++i) {
      CK(cuMemUnmap(base + i * g_page, g_page));
      CK(cuMemRelease(handles[i]));
    }
    double t2 = now_us();
    map_us.push_back((t1 - t0) / pages);
    unmap_us.push_back((t2 - t1) / pages);
  }
  CK(cuMemAddressFree(base, g_page * pages));
  std::printf("%-28s pages=%3d page=%zuMiB naive      create+map+access %7.2f us/page  unmap+release %7.2f\n",
              state, pages, g_page >> 20, median(map_us), median(unmap_us));
  char entry[256];
  std::snprintf(entry, sizeof entry,
                ", {\"variant\": \"naive, %s\", \"page_mib\": %zu, \"map_access_us\": %.2f, \"unmap_us\": %.2f}",
                state, g_page >> 20, median(map_us), median(unmap_us));
  g_json += entry;
}

// Another tenant's memory: `count` handles of one page, each mapped and accessible.
struct Tenant {
  std::vector<CUmemGenericAllocationHandle> handles;
  CUdeviceptr base = 0;
  size_t size = 0;
};

static Tenant hold(size_t count) {
  CUmemAllocationProp prop = device_prop();
  CUmemAccessDesc access = read_write(prop);
  Tenant tenant;
  tenant.size = count * g_page;
  tenant.handles.resize(count);
  CK(cuMemAddressReserve(&tenant.base, tenant.size, 0, 0, 0));
  for (size_t i = 0; i < count; ++i) {
    CK(cuMemCreate(&tenant.handles[i], g_page, &prop, 0));
    CK(cuMemMap(tenant.base + i * g_page, g_page, 0, tenant.handles[i], 0));
  }
  CK(cuMemSetAccess(tenant.base, tenant.size, &access, 1));
  return tenant;
}

static void drop(Tenant& tenant) {
  CK(cuMemUnmap(tenant.base, tenant.size));
  for (auto h : tenant.handles) CK(cuMemRelease(h));
  CK(cuMemAddressFree(tenant.base, tenant.size));
}

int main(int argc, char** argv) {
  int pages = argc > 1 ? std::atoi(argv[1]) : 64;
  int repeats = argc > 2 ? std::atoi(argv[2]) : 15;
  CK(cuInit(0));
  CUdevice dev;
  CK(cuDeviceGet(&dev, 0));
  CK(cuDevicePrimaryCtxRetain(&g_ctx, dev));
  CK(cuCtxSetCurrent(g_ctx));
  CUmemAllocationProp prop = device_prop();
  CK(cuMemGetAllocationGranularity(&g_page, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
  int driver = 0;
  cuDriverGetVersion(&driver);
  std::printf("driver API %d, granularity %zu\n", driver, g_page);
  const CUmemAllocationHandleType none = CU_MEM_HANDLE_TYPE_NONE;
  const CUmemAllocationHandleType fd = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  std::vector<Variant> variants = {
      {"baseline (one access/run)", 1, none, 0, false},
      {"access per page", 1, none, 0, true},
      {"posix-fd handles", 1, fd, 0, false},
      {"va aligned 1 GiB", 1, none, size_t(1) << 30, false},
      {"threads", 2, none, 0, false},
      {"threads", 4, none, 0, false},
      {"threads", 8, none, 0, false},
      {"threads", 16, none, 0, false},
  };
  for (const auto& v : variants) run(v, pages, repeats);
  run_naive("idle device", pages, repeats);
  {
    // A serving node: 40 GiB already held by another tenant in single-page handles.
    Tenant tenant = hold((size_t(40) << 30) / g_page);
    run({"40 GiB held by a tenant", 1, none, 0, false}, pages, repeats);
    run_naive("40 GiB held by a tenant", pages, repeats);
    drop(tenant);
  }
  {
    // The device busy: a stream of memsets over 2 GiB queued, about 0.3 s of work.
    CUstream stream;
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    CUdeviceptr busy;
    const size_t busy_bytes = size_t(2) << 30;
    CK(cuMemAlloc(&busy, busy_bytes));
    // Few enough that queuing them does not block (the driver's queue is finite).
    double queued_at = now_us();
    for (int i = 0; i < 400; ++i) CK(cuMemsetD8Async(busy, i & 0xff, busy_bytes, stream));
    std::printf("400 memsets of 2 GiB queued in %.1f ms\n", (now_us() - queued_at) / 1e3);
    {
      // The first map while the stream runs: does the driver wait for the device?
      Tenant one = hold(1);
      double first = now_us();
      drop(one);
      one = hold(1);
      double second = now_us();
      drop(one);
      std::printf("one page while busy: unmap+release+create+map+access %.0f us\n", second - first);
      char entry[128];
      std::snprintf(entry, sizeof entry, ", {\"variant\": \"one page cycled while busy\", \"us\": %.1f}",
                    second - first);
      g_json += entry;
    }
    double t0 = now_us();
    run({"device busy (memset stream)", 1, none, 0, false}, pages, repeats);
    run_naive("device busy (memset stream)", pages, repeats);
    double t1 = now_us();
    bool still_busy = cuStreamQuery(stream) == CUDA_ERROR_NOT_READY;
    std::printf("busy stream still running after the busy variants (%.0f ms): %s\n", (t1 - t0) / 1e3,
                still_busy ? "yes" : "no");
    g_json += std::string(", {\"variant\": \"busy stream outlasted the busy variants\", \"result\": ") +
              (still_busy ? "true" : "false") + "}";
    CK(cuStreamSynchronize(stream));
    CK(cuMemFree(busy));
    CK(cuStreamDestroy(stream));
  }
  for (size_t mult : {16}) {
    size_t saved = g_page;
    g_page = saved * mult;
    run({"baseline", 1, none, 0, false}, pages, repeats);
    run({"threads", 8, none, 0, false}, pages, repeats);
    g_page = saved;
  }
  probe_access_after_remap();
  std::printf("{\"bench\": \"cuda_vmm_probe\", \"driver\": %d, \"pages\": %d, \"results\": [%s]}\n", driver,
              pages, g_json.c_str());
  return 0;
}
