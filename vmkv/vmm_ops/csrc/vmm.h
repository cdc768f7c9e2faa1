// Vmm: batched, validated, all-or-nothing virtual-memory operations over one Driver.
//
// Page ids and reservations handed to Python are Vmm's own, so a bad id from Python is a
// clear ValueError instead of a driver crash, and everything still alive when the Vmm is
// destroyed is unmapped and released (RAII at the level of the whole address space).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "driver.h"

namespace vmkv {

struct VmmStats {
  size_t pages = 0;         // physical pages alive
  size_t mapped = 0;        // mappings alive
  size_t reservations = 0;
  size_t reserved_bytes = 0;
  size_t resident_bytes = 0;  // backend-specific (host: bytes the memfd really holds)
  uint64_t map_calls = 0;
  uint64_t unmap_calls = 0;
  uint64_t pages_created = 0;
  uint64_t pages_released = 0;
};

using MapPair = std::pair<uintptr_t, uint64_t>;  // (virtual address, page id)

class Vmm {
 public:
  Vmm(std::unique_ptr<Driver> driver, size_t page_size);
  Vmm(const Vmm&) = delete;
  Vmm& operator=(const Vmm&) = delete;
  ~Vmm();

  const char* kind() const { return driver_->kind(); }
  int device() const { return driver_->device(); }
  size_t page_size() const { return page_size_; }
  size_t granularity();
  MemInfo mem_info();

  uintptr_t reserve(size_t size);
  void release_reservation(uintptr_t va);

  // All-or-nothing: on a failure every page created by this call is released again.
  std::vector<uint64_t> create_pages(size_t count);
  // Every page must exist and be unmapped; checked for all before any is released.
  void release_pages(const std::vector<uint64_t>& pages);

  // Maps each page at its address. Every address must be page-aligned, inside one
  // reservation and unmapped; every page must exist and be unmapped; no address or page
  // may repeat. On a driver failure the pages mapped so far are unmapped again (one
  // that cannot be stays recorded as mapped, so that no page is mapped twice).
  void map(const std::vector<MapPair>& pairs);
  // Unmaps each address; returns the page ids that were mapped there, in order. On a
  // driver failure the addresses before it are unmapped and recorded so (see mapped).
  std::vector<uint64_t> unmap(const std::vector<uintptr_t>& addresses);
  // Whether each address has a page mapped: after a batch failed part-way, what it left.
  std::vector<bool> mapped(const std::vector<uintptr_t>& addresses);
  // Wait for the work already queued on the device (see Driver::quiesce). unmap does it
  // itself; copies out of pages that kernels may still be writing need it first.
  void synchronize() { driver_->quiesce(); }

  // Page-locks [address, address + size) of host memory for device copies (4 KiB aligned,
  // not overlapping another registration). Undone by unregister_host or at destruction.
  void register_host(uintptr_t address, size_t size);
  void unregister_host(uintptr_t address);

  VmmStats stats();

 private:
  void check_mappable(const std::vector<MapPair>& pairs) const;
  void undo_maps(const std::vector<MapPair>& pairs, size_t count);
  const std::pair<const uintptr_t, size_t>* find_reservation(uintptr_t va) const;

  std::unique_ptr<Driver> driver_;
  size_t page_size_;
  std::mutex mutex_;
  std::map<uintptr_t, size_t> reservations_;            // start -> size
  std::unordered_map<uint64_t, NativeHandle> pages_;    // page id -> driver handle
  std::unordered_map<uint64_t, uintptr_t> page_at_;     // mapped page id -> address
  std::map<uintptr_t, uint64_t> mapping_at_;            // address -> mapped page id
  std::map<uintptr_t, size_t> host_registrations_;      // start -> size
  uint64_t next_page_id_ = 1;
  VmmStats counters_;
};

}  // namespace vmkv
