/* A stand-in libascendcl.so for machines without Ascend hardware.
 *
 * It implements the AscendCL entry points that vmkv's ACL backend calls, over host
 * memory, following CANN's documented semantics so that the real backend code runs
 * against it: granularity is fixed at 2 MiB; a physical handle is mapped whole (the map
 * size must equal the physical size, offset 0); unmap takes only the address; there is
 * no set-access step; contexts are per thread. Error codes are CANN's real values.
 *
 * Knobs (read at aclInit): VMKV_SHIM_HBM_BYTES (device memory, default 1 GiB) and
 * VMKV_SHIM_DEVICES (device count, default 1).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int aclError;
typedef void *aclrtContext;
typedef void *aclrtDrvMemHandle;

typedef struct {
  uint32_t id;
  int type;
} aclrtMemLocation;

typedef struct {
  int handleType;
  int allocationType;
  int memAttr;
  aclrtMemLocation location;
  uint64_t reserve;
} aclrtPhysicalMemProp;

enum {
  ACL_SUCCESS = 0,
  ACL_ERROR_INVALID_PARAM = 100000,
  ACL_ERROR_UNINITIALIZE = 100001,
  ACL_ERROR_REPEAT_INITIALIZE = 100002,
  ACL_ERROR_RT_PARAM_INVALID = 107000,
  ACL_ERROR_RT_INVALID_DEVICEID = 107001,
  ACL_ERROR_RT_CONTEXT_NULL = 107002,
  ACL_ERROR_RT_ADDR_UNALIGNED = 107008,
  ACL_ERROR_RT_INVALID_HANDLE = 107017,
  ACL_ERROR_RT_MEMORY_ALLOCATION = 207001,
};

#define GRANULARITY ((size_t)2 << 20)
#define MAX_OBJECTS 65536
#define DEVICE_LOCATION 1

typedef struct {
  int live;
  size_t size;
  int device;
  uintptr_t mapped_at; /* 0 when unmapped */
} Physical;

typedef struct {
  int live;
  uintptr_t start;
  size_t size;
} Reservation;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialized;
static size_t g_capacity = (size_t)1 << 30;
static size_t g_used;
static uint32_t g_devices = 1;
static Physical g_physical[MAX_OBJECTS];
static Reservation g_reservations[MAX_OBJECTS];
static int g_contexts[16]; /* a context is the address of its device's slot */
/* Host memory behind a handle: one anonymous shared region per handle, kept aside
 * (never mapped anywhere else) and remapped into the reservation with mremap. */
static void *g_backing[MAX_OBJECTS];
static __thread aclrtContext t_context;
static __thread char t_message[256];

static aclError fail(aclError code, const char *message) {
  snprintf(t_message, sizeof(t_message), "%s", message);
  return code;
}

static int current_device(void) {
  return t_context == NULL ? -1 : (int)((int *)t_context - g_contexts);
}

aclError aclInit(const char *config_path) {
  (void)config_path;
  pthread_mutex_lock(&g_lock);
  aclError rc = ACL_SUCCESS;
  if (g_initialized) {
    rc = ACL_ERROR_REPEAT_INITIALIZE;
  } else {
    const char *bytes = getenv("VMKV_SHIM_HBM_BYTES");
    const char *devices = getenv("VMKV_SHIM_DEVICES");
    if (bytes != NULL) g_capacity = strtoull(bytes, NULL, 10);
    if (devices != NULL) g_devices = (uint32_t)strtoul(devices, NULL, 10);
    g_initialized = 1;
  }
  pthread_mutex_unlock(&g_lock);
  return rc;
}

const char *aclGetRecentErrMsg(void) { return t_message; }

aclError aclrtGetDeviceCount(uint32_t *count) {
  if (!g_initialized) return fail(ACL_ERROR_UNINITIALIZE, "aclInit was not called");
  *count = g_devices;
  return ACL_SUCCESS;
}

aclError aclrtSetDevice(int32_t device) {
  if (!g_initialized) return fail(ACL_ERROR_UNINITIALIZE, "aclInit was not called");
  if (device < 0 || (uint32_t)device >= g_devices) return fail(ACL_ERROR_RT_INVALID_DEVICEID, "no such device");
  t_context = &g_contexts[device];
  return ACL_SUCCESS;
}

aclError aclrtGetCurrentContext(aclrtContext *context) {
  if (t_context == NULL) return fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context");
  *context = t_context;
  return ACL_SUCCESS;
}

aclError aclrtSetCurrentContext(aclrtContext context) {
  int *slot = (int *)context;
  if (slot < g_contexts || slot >= g_contexts + g_devices) return fail(ACL_ERROR_RT_CONTEXT_NULL, "bad context");
  t_context = context;
  return ACL_SUCCESS;
}

aclError aclrtGetMemInfo(int attr, size_t *free_bytes, size_t *total) {
  (void)attr;
  if (current_device() < 0) return fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context");
  pthread_mutex_lock(&g_lock);
  *free_bytes = g_capacity - g_used;
  *total = g_capacity;
  pthread_mutex_unlock(&g_lock);
  return ACL_SUCCESS;
}

aclError aclrtMemGetAllocationGranularity(aclrtPhysicalMemProp *prop, int option, size_t *granularity) {
  if (prop == NULL || granularity == NULL || (option != 0 && option != 1)) {
    return fail(ACL_ERROR_INVALID_PARAM, "bad granularity query");
  }
  *granularity = GRANULARITY;
  return ACL_SUCCESS;
}

static Reservation *reservation_containing(uintptr_t va, size_t size) {
  for (int i = 0; i < MAX_OBJECTS; ++i) {
    Reservation *r = &g_reservations[i];
    if (r->live && va >= r->start && va + size <= r->start + r->size) return r;
  }
  return NULL;
}

aclError aclrtReserveMemAddress(void **ptr, size_t size, size_t alignment, void *expect, uint64_t flags) {
  if (current_device() < 0) return fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context");
  if (ptr == NULL || size == 0 || size % GRANULARITY != 0 || alignment != 0 || expect != NULL || flags > 1) {
    return fail(ACL_ERROR_INVALID_PARAM, "bad reservation request");
  }
  size_t span = size + GRANULARITY;
  void *raw = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "address space exhausted");
  uintptr_t start = ((uintptr_t)raw + GRANULARITY - 1) / GRANULARITY * GRANULARITY;
  if (start > (uintptr_t)raw) munmap(raw, start - (uintptr_t)raw);
  if ((uintptr_t)raw + span > start + size) munmap((void *)(start + size), (uintptr_t)raw + span - start - size);
  pthread_mutex_lock(&g_lock);
  for (int i = 0; i < MAX_OBJECTS; ++i) {
    if (!g_reservations[i].live) {
      g_reservations[i] = (Reservation){1, start, size};
      pthread_mutex_unlock(&g_lock);
      *ptr = (void *)start;
      return ACL_SUCCESS;
    }
  }
  pthread_mutex_unlock(&g_lock);
  munmap((void *)start, size);
  return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "too many reservations");
}

aclError aclrtReleaseMemAddress(void *ptr) {
  pthread_mutex_lock(&g_lock);
  for (int i = 0; i < MAX_OBJECTS; ++i) {
    Reservation *r = &g_reservations[i];
    if (r->live && r->start == (uintptr_t)ptr) {
      for (int j = 0; j < MAX_OBJECTS; ++j) {
        uintptr_t at = g_physical[j].mapped_at;
        if (g_physical[j].live && at != 0 && at >= r->start && at < r->start + r->size) {
          pthread_mutex_unlock(&g_lock);
          return fail(ACL_ERROR_RT_PARAM_INVALID, "reservation still has mappings");
        }
      }
      munmap(ptr, r->size);
      r->live = 0;
      pthread_mutex_unlock(&g_lock);
      return ACL_SUCCESS;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ACL_ERROR_RT_PARAM_INVALID, "not a reservation");
}

/* A handle is 1 + its slot index, so NULL is never a valid handle. */
static Physical *physical(aclrtDrvMemHandle handle) {
  uintptr_t index = (uintptr_t)handle;
  if (index == 0 || index > MAX_OBJECTS || !g_physical[index - 1].live) return NULL;
  return &g_physical[index - 1];
}

aclError aclrtMallocPhysical(aclrtDrvMemHandle *handle, size_t size, const aclrtPhysicalMemProp *prop,
                             uint64_t flags) {
  int device = current_device();
  if (device < 0) return fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context");
  if (handle == NULL || prop == NULL || flags != 0 || size == 0 || size % GRANULARITY != 0 ||
      prop->location.type != DEVICE_LOCATION || prop->location.id != (uint32_t)device || prop->handleType != 0 ||
      prop->allocationType != 0) {
    return fail(ACL_ERROR_INVALID_PARAM, "bad physical allocation request");
  }
  pthread_mutex_lock(&g_lock);
  if (g_used + size > g_capacity) {
    pthread_mutex_unlock(&g_lock);
    return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "device memory exhausted");
  }
  for (int i = 0; i < MAX_OBJECTS; ++i) {
    if (!g_physical[i].live) {
      g_physical[i] = (Physical){1, size, device, 0};
      g_used += size;
      pthread_mutex_unlock(&g_lock);
      *handle = (aclrtDrvMemHandle)(uintptr_t)(i + 1);
      return ACL_SUCCESS;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "too many handles");
}

aclError aclrtFreePhysical(aclrtDrvMemHandle handle) {
  pthread_mutex_lock(&g_lock);
  Physical *p = physical(handle);
  aclError rc = ACL_SUCCESS;
  if (p == NULL) {
    rc = fail(ACL_ERROR_RT_INVALID_HANDLE, "unknown handle");
  } else if (p->mapped_at != 0) {
    rc = fail(ACL_ERROR_RT_PARAM_INVALID, "handle is still mapped");
  } else {
    size_t index = (size_t)((uintptr_t)handle - 1);
    if (g_backing[index] != NULL && g_backing[index] != MAP_FAILED) munmap(g_backing[index], p->size);
    g_backing[index] = NULL;
    g_used -= p->size;
    p->live = 0;
  }
  pthread_mutex_unlock(&g_lock);
  return rc;
}


/* Test hooks, not ACL: after `count` more successful maps (unmaps), every map (unmap)
 * fails as a driver error would (a negative count turns this off), so that tests can
 * reach the callers' handling of a batch that fails part-way. */
static int g_maps_before_failure = -1;
static int g_unmaps_before_failure = -1;

void vmkv_shim_fail_maps_after(int count) {
  pthread_mutex_lock(&g_lock);
  g_maps_before_failure = count;
  pthread_mutex_unlock(&g_lock);
}

void vmkv_shim_fail_unmaps_after(int count) {
  pthread_mutex_lock(&g_lock);
  g_unmaps_before_failure = count;
  pthread_mutex_unlock(&g_lock);
}

aclError aclrtMapMem(void *ptr, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags) {
  uintptr_t va = (uintptr_t)ptr;
  pthread_mutex_lock(&g_lock);
  Physical *p = physical(handle);
  aclError rc = ACL_SUCCESS;
  if (g_maps_before_failure == 0) {
    rc = fail(ACL_ERROR_RT_PARAM_INVALID, "map failure injected by the test");
  } else if (p == NULL) {
    rc = fail(ACL_ERROR_RT_INVALID_HANDLE, "unknown handle");
  } else if (size != p->size || offset != 0 || flags != 0) {
    rc = fail(ACL_ERROR_INVALID_PARAM, "a physical handle must be mapped whole");
  } else if (va % GRANULARITY != 0) {
    rc = fail(ACL_ERROR_RT_ADDR_UNALIGNED, "address is not aligned");
  } else if (p->mapped_at != 0 || reservation_containing(va, size) == NULL) {
    rc = fail(ACL_ERROR_RT_PARAM_INVALID, "handle already mapped or address outside a reservation");
  } else {
    for (int i = 0; i < MAX_OBJECTS && rc == ACL_SUCCESS; ++i) {
      uintptr_t at = g_physical[i].mapped_at;
      if (g_physical[i].live && at != 0 && va < at + g_physical[i].size && at < va + size) {
        rc = fail(ACL_ERROR_RT_PARAM_INVALID, "address range already mapped");
      }
    }
  }
  if (rc == ACL_SUCCESS) {
    size_t index = (size_t)((uintptr_t)handle - 1);
    if (g_backing[index] == NULL) {
      g_backing[index] = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    }
    /* Keep one alias outside the reservation so the memory survives unmapping. */
    void *got = g_backing[index] == MAP_FAILED
                    ? MAP_FAILED
                    : mremap(g_backing[index], 0, size, MREMAP_MAYMOVE | MREMAP_FIXED, ptr);
    if (got == MAP_FAILED) {
      rc = fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "host mapping failed");
    } else {
      p->mapped_at = va;
      if (g_maps_before_failure > 0) --g_maps_before_failure;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return rc;
}

/* Host memory has no queue of device work: nothing to wait for. Counted, so that tests
 * can check that vmkv waits for the device once before each unmap batch. */
static int g_device_syncs = 0;

aclError aclrtSynchronizeDevice(void) {
  pthread_mutex_lock(&g_lock);
  ++g_device_syncs;
  pthread_mutex_unlock(&g_lock);
  return ACL_SUCCESS;
}

/* Test hook: how many times the device was synchronized. */
int vmkv_shim_device_syncs(void) {
  pthread_mutex_lock(&g_lock);
  int count = g_device_syncs;
  pthread_mutex_unlock(&g_lock);
  return count;
}

aclError aclrtUnmapMem(void *ptr) {
  uintptr_t va = (uintptr_t)ptr;
  pthread_mutex_lock(&g_lock);
  if (g_unmaps_before_failure == 0) {
    pthread_mutex_unlock(&g_lock);
    return fail(ACL_ERROR_RT_PARAM_INVALID, "unmap failure injected by the test");
  }
  if (g_unmaps_before_failure > 0) --g_unmaps_before_failure;
  for (int i = 0; i < MAX_OBJECTS; ++i) {
    Physical *p = &g_physical[i];
    if (p->live && p->mapped_at == va) {
      mmap(ptr, p->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
      p->mapped_at = 0;
      pthread_mutex_unlock(&g_lock);
      return ACL_SUCCESS;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ACL_ERROR_RT_PARAM_INVALID, "nothing is mapped at this address");
}

/* Host registration: CANN requires a 4 KiB aligned address and rejects a second
 * registration of the same address; unregistering an unknown address is an error. */
#define MAX_HOST_REGISTRATIONS 64
static uintptr_t g_host_registered[MAX_HOST_REGISTRATIONS];

aclError aclrtHostRegister(void *ptr, uint64_t size, int type, void **dev_ptr) {
  uintptr_t address = (uintptr_t)ptr;
  if (current_device() < 0) return fail(ACL_ERROR_RT_CONTEXT_NULL, "no current context");
  if (ptr == NULL || size == 0 || dev_ptr == NULL || type != 0) {
    return fail(ACL_ERROR_RT_PARAM_INVALID, "bad host registration arguments");
  }
  if (address % 4096 != 0) return fail(ACL_ERROR_RT_ADDR_UNALIGNED, "host address is not 4 KiB aligned");
  pthread_mutex_lock(&g_lock);
  int free_index = -1;
  for (int i = 0; i < MAX_HOST_REGISTRATIONS; ++i) {
    if (g_host_registered[i] == address) {
      pthread_mutex_unlock(&g_lock);
      return fail(ACL_ERROR_RT_PARAM_INVALID, "host address already registered");
    }
    if (g_host_registered[i] == 0 && free_index < 0) free_index = i;
  }
  if (free_index < 0) {
    pthread_mutex_unlock(&g_lock);
    return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "too many host registrations");
  }
  g_host_registered[free_index] = address;
  pthread_mutex_unlock(&g_lock);
  *dev_ptr = ptr;
  return ACL_SUCCESS;
}

aclError aclrtHostUnregister(void *ptr) {
  pthread_mutex_lock(&g_lock);
  for (int i = 0; i < MAX_HOST_REGISTRATIONS; ++i) {
    if (g_host_registered[i] == (uintptr_t)ptr) {
      g_host_registered[i] = 0;
      pthread_mutex_unlock(&g_lock);
      return ACL_SUCCESS;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ACL_ERROR_RT_PARAM_INVALID, "host address is not registered");
}

/* Test hook: how many host ranges are registered now. */
int vmkv_shim_host_registrations(void) {
  int count = 0;
  pthread_mutex_lock(&g_lock);
  for (int i = 0; i < MAX_HOST_REGISTRATIONS; ++i) count += g_host_registered[i] != 0;
  pthread_mutex_unlock(&g_lock);
  return count;
}
