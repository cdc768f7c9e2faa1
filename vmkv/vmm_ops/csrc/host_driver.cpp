// Host backend: real virtual-memory remapping over one memfd.
//
// Reserving address space is a PROT_NONE mapping; a physical page is a page-sized slot of
// a memfd, allocated with fallocate; mapping puts that slot at a fixed address with
// MAP_SHARED|MAP_FIXED; unmapping puts PROT_NONE back; releasing punches a hole so the
// memory really goes back to the OS. One memfd (not one per page) keeps the fd count flat.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

#include "driver.h"

namespace vmkv {
namespace {

[[noreturn]] void throw_errno(const char* call, int err) {
  const char* name = strerrorname_np(err);
  bool oom = err == ENOMEM || err == ENOSPC;
  throw DriverError(name != nullptr ? name : "EUNKNOWN", err, std::string(call) + " failed: " + strerror(err), oom);
}

size_t os_page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

size_t total_ram_bytes() {
  return static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * os_page_size();
}

class HostDriver final : public Driver {
 public:
  HostDriver(int device, size_t page_size, size_t capacity_bytes)
      : device_(device), page_size_(page_size), capacity_(capacity_bytes) {
    std::string name = "vmkv-host-dev" + std::to_string(device);
    fd_ = memfd_create(name.c_str(), MFD_CLOEXEC);
    if (fd_ < 0) throw_errno("memfd_create", errno);
  }
  ~HostDriver() override { close(fd_); }

  const char* kind() const override { return "host"; }
  int device() const override { return device_; }
  size_t granularity() override { return os_page_size(); }

  MemInfo mem_info() override {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t used = live_slots_ * page_size_;
    return MemInfo{capacity_ > used ? capacity_ - used : 0, capacity_};
  }

  uintptr_t reserve(size_t size, size_t alignment) override {
    // Over-reserve, then trim, so the returned range is aligned to `alignment`.
    size_t span = size + alignment;
    void* raw = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) throw_errno("mmap(PROT_NONE)", errno);
    uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    uintptr_t aligned = (start + alignment - 1) / alignment * alignment;
    if (aligned > start) munmap(raw, aligned - start);
    uintptr_t tail = aligned + size;
    if (start + span > tail) munmap(reinterpret_cast<void*>(tail), start + span - tail);
    return aligned;
  }

  void free_reservation(uintptr_t va, size_t size) override {
    if (munmap(reinterpret_cast<void*>(va), size) != 0) throw_errno("munmap", errno);
  }

  NativeHandle create(size_t size) override {
    check_page_size(size);
    std::lock_guard<std::mutex> lock(mutex_);
    if ((live_slots_ + 1) * page_size_ > capacity_) {
      throw DriverError("HOST_ERROR_OUT_OF_MEMORY", ENOMEM,
                        "host device capacity of " + std::to_string(capacity_) + " bytes is exhausted", true);
    }
    size_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      slot = slot_count_++;
    }
    off_t offset = static_cast<off_t>(slot * page_size_);
    if (fallocate(fd_, 0, offset, static_cast<off_t>(page_size_)) != 0) {
      int err = errno;
      free_slots_.push_back(slot);
      throw_errno("fallocate", err);
    }
    ++live_slots_;
    return static_cast<NativeHandle>(offset);
  }

  void release(NativeHandle handle) override {
    std::lock_guard<std::mutex> lock(mutex_);
    off_t offset = static_cast<off_t>(handle);
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, static_cast<off_t>(page_size_)) != 0) {
      throw_errno("fallocate(PUNCH_HOLE)", errno);
    }
    free_slots_.push_back(static_cast<size_t>(offset) / page_size_);
    --live_slots_;
  }

  void map(uintptr_t va, size_t size, NativeHandle handle) override {
    check_page_size(size);
    void* got = mmap(reinterpret_cast<void*>(va), size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_,
                     static_cast<off_t>(handle));
    if (got == MAP_FAILED) throw_errno("mmap(MAP_FIXED)", errno);
  }

  void unmap(uintptr_t va, size_t size) override {
    void* got = mmap(reinterpret_cast<void*>(va), size, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (got == MAP_FAILED) throw_errno("mmap(PROT_NONE)", errno);
  }

  size_t resident_bytes() override {
    struct stat st {};
    if (fstat(fd_, &st) != 0) throw_errno("fstat", errno);
    return static_cast<size_t>(st.st_blocks) * 512;
  }

 private:
  void check_page_size(size_t size) const {
    if (size != page_size_) {
      throw std::invalid_argument("host pages are " + std::to_string(page_size_) + " bytes, got " +
                                  std::to_string(size));
    }
  }

  int device_;
  size_t page_size_;
  size_t capacity_;
  int fd_ = -1;
  std::mutex mutex_;
  std::vector<size_t> free_slots_;
  size_t slot_count_ = 0;
  size_t live_slots_ = 0;
};

}  // namespace

std::unique_ptr<Driver> make_host_driver(int device, size_t page_size, size_t capacity_bytes) {
  if (device != 0) throw std::invalid_argument("the host backend has one device (0), got " + std::to_string(device));
  if (page_size == 0 || page_size % os_page_size() != 0) {
    throw std::invalid_argument("host page_size must be a positive multiple of " + std::to_string(os_page_size()) +
                                ", got " + std::to_string(page_size));
  }
  return std::make_unique<HostDriver>(device, page_size, capacity_bytes != 0 ? capacity_bytes : total_ram_bytes());
}

ProbeResult probe_host() {
  ProbeResult result;
  int fd = memfd_create("vmkv-probe", MFD_CLOEXEC);
  if (fd < 0) {
    result.reason = std::string("memfd_create failed: ") + strerror(errno);
    return result;
  }
  close(fd);
  result.available = true;
  result.device_count = 1;
  result.granularity = os_page_size();
  return result;
}

}  // namespace vmkv
