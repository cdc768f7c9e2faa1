#include "vmm.h"

#include <algorithm>
#include <string>
#include <unordered_set>

namespace vmkv {
namespace {

std::string hex(uintptr_t value) {
  char buffer[32];
  snprintf(buffer, sizeof(buffer), "0x%lx", static_cast<unsigned long>(value));
  return buffer;
}

// Batches larger than this are checked against the device's size before any page is
// created: a count no device can hold is a miss at once, not a vector of its size.
constexpr size_t kCheckedCreateCount = 4096;

}  // namespace

Vmm::Vmm(std::unique_ptr<Driver> driver, size_t page_size) : driver_(std::move(driver)), page_size_(page_size) {
  size_t granularity = driver_->granularity();
  if (page_size_ == 0) page_size_ = granularity;
  if (page_size_ % granularity != 0) {
    throw std::invalid_argument("page_size " + std::to_string(page_size_) + " is not a multiple of the " +
                                driver_->kind() + " granularity " + std::to_string(granularity));
  }
}

// Teardown never throws: a driver that already went away (process exit) must not turn a
// destructor into std::terminate.
Vmm::~Vmm() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [va, page] : mapping_at_) {
    try {
      driver_->unmap(va, page_size_);
    } catch (const std::exception&) {
    }
  }
  for (const auto& [page, handle] : pages_) {
    try {
      driver_->release(handle);
    } catch (const std::exception&) {
    }
  }
  for (const auto& [va, size] : reservations_) {
    try {
      driver_->free_reservation(va, size);
    } catch (const std::exception&) {
    }
  }
  for (const auto& [address, size] : host_registrations_) {
    try {
      driver_->unregister_host(address);
    } catch (const std::exception&) {
    }
  }
}

size_t Vmm::granularity() { return driver_->granularity(); }

MemInfo Vmm::mem_info() { return driver_->mem_info(); }

uintptr_t Vmm::reserve(size_t size) {
  if (size == 0 || size % page_size_ != 0) {
    throw std::invalid_argument("reservation size " + std::to_string(size) + " is not a positive multiple of page_size " +
                                std::to_string(page_size_));
  }
  uintptr_t va = driver_->reserve(size, page_size_);
  std::lock_guard<std::mutex> lock(mutex_);
  reservations_.emplace(va, size);
  ++counters_.reservations;
  counters_.reserved_bytes += size;
  return va;
}

void Vmm::release_reservation(uintptr_t va) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.find(va);
  if (it == reservations_.end()) throw std::invalid_argument("no reservation starts at " + hex(va));
  size_t size = it->second;
  auto live = mapping_at_.lower_bound(va);
  if (live != mapping_at_.end() && live->first < va + size) {
    throw std::invalid_argument("reservation " + hex(va) + " still has a page mapped at " + hex(live->first));
  }
  driver_->free_reservation(va, size);
  reservations_.erase(it);
  --counters_.reservations;
  counters_.reserved_bytes -= size;
}

std::vector<uint64_t> Vmm::create_pages(size_t count) {
  if (count > kCheckedCreateCount && count > driver_->mem_info().total_bytes / page_size_) {
    throw DriverError("OUT_OF_MEMORY", 0,
                      std::to_string(count) + " pages of " + std::to_string(page_size_) +
                          " bytes exceed the whole device",
                      true);
  }
  std::vector<NativeHandle> handles;
  handles.reserve(count);
  try {
    for (size_t i = 0; i < count; ++i) handles.push_back(driver_->create(page_size_));
  } catch (...) {
    for (NativeHandle handle : handles) {
      try {
        driver_->release(handle);
      } catch (const std::exception&) {
      }
    }
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<uint64_t> ids;
  ids.reserve(count);
  for (NativeHandle handle : handles) {
    uint64_t id = next_page_id_++;
    pages_.emplace(id, handle);
    ids.push_back(id);
  }
  counters_.pages_created += count;
  return ids;
}

void Vmm::release_pages(const std::vector<uint64_t>& pages) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::unordered_set<uint64_t> seen;
  for (uint64_t page : pages) {
    if (pages_.count(page) == 0) throw std::invalid_argument("page " + std::to_string(page) + " does not exist");
    if (page_at_.count(page) != 0) {
      throw std::invalid_argument("page " + std::to_string(page) + " is still mapped at " + hex(page_at_.at(page)));
    }
    if (!seen.insert(page).second) throw std::invalid_argument("page " + std::to_string(page) + " is listed twice");
  }
  for (uint64_t page : pages) {
    driver_->release(pages_.at(page));
    pages_.erase(page);
    ++counters_.pages_released;
  }
}

const std::pair<const uintptr_t, size_t>* Vmm::find_reservation(uintptr_t va) const {
  auto it = reservations_.upper_bound(va);
  if (it == reservations_.begin()) return nullptr;
  --it;
  if (va - it->first > it->second - page_size_) return nullptr;  // no overflow near the top
  return &*it;
}

void Vmm::check_mappable(const std::vector<MapPair>& pairs) const {
  std::unordered_set<uintptr_t> addresses;
  std::unordered_set<uint64_t> pages;
  for (const auto& [va, page] : pairs) {
    if (va % page_size_ != 0) throw std::invalid_argument("address " + hex(va) + " is not page-aligned");
    if (find_reservation(va) == nullptr) {
      throw std::invalid_argument("address " + hex(va) + " is not inside a reservation");
    }
    if (mapping_at_.count(va) != 0 || !addresses.insert(va).second) {
      throw std::invalid_argument("address " + hex(va) + " is already mapped");
    }
    if (pages_.count(page) == 0) throw std::invalid_argument("page " + std::to_string(page) + " does not exist");
    if (page_at_.count(page) != 0 || !pages.insert(page).second) {
      throw std::invalid_argument("page " + std::to_string(page) + " is already mapped");
    }
  }
}

void Vmm::undo_maps(const std::vector<MapPair>& pairs, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    try {
      driver_->unmap(pairs[i].first, page_size_);
    } catch (const std::exception&) {
      // Still mapped: recorded so, the page cannot be mapped a second time elsewhere
      // (two addresses over one page would corrupt both), and unmap can retry it.
      mapping_at_.emplace(pairs[i].first, pairs[i].second);
      page_at_.emplace(pairs[i].second, pairs[i].first);
    }
  }
}

void Vmm::map(const std::vector<MapPair>& pairs) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_mappable(pairs);
  std::vector<MapPair> sorted(pairs);
  std::sort(sorted.begin(), sorted.end());
  size_t done = 0;
  try {
    for (; done < sorted.size(); ++done) driver_->map(sorted[done].first, page_size_, pages_.at(sorted[done].second));
    // One access grant per contiguous run of addresses.
    size_t run_start = 0;
    for (size_t i = 1; i <= sorted.size(); ++i) {
      if (i == sorted.size() || sorted[i].first != sorted[i - 1].first + page_size_) {
        driver_->set_access(sorted[run_start].first, (i - run_start) * page_size_);
        run_start = i;
      }
    }
  } catch (...) {
    undo_maps(sorted, done);
    throw;
  }
  for (const auto& [va, page] : sorted) {
    mapping_at_.emplace(va, page);
    page_at_.emplace(page, va);
  }
  counters_.map_calls += 1;
}

std::vector<uint64_t> Vmm::unmap(const std::vector<uintptr_t>& addresses) {
  // Outside the lock: other threads' maps need not wait for the device as well.
  if (!addresses.empty()) driver_->quiesce();
  std::lock_guard<std::mutex> lock(mutex_);
  std::unordered_set<uintptr_t> seen;
  std::vector<uint64_t> pages;
  pages.reserve(addresses.size());
  for (uintptr_t va : addresses) {
    auto it = mapping_at_.find(va);
    if (it == mapping_at_.end()) throw std::invalid_argument("nothing is mapped at " + hex(va));
    if (!seen.insert(va).second) throw std::invalid_argument("address " + hex(va) + " is listed twice");
    pages.push_back(it->second);
  }
  // A driver failure part-way leaves the bookkeeping exactly matching what was unmapped.
  for (size_t i = 0; i < addresses.size(); ++i) {
    driver_->unmap(addresses[i], page_size_);
    mapping_at_.erase(addresses[i]);
    page_at_.erase(pages[i]);
  }
  counters_.unmap_calls += 1;
  return pages;
}

std::vector<bool> Vmm::mapped(const std::vector<uintptr_t>& addresses) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<bool> out;
  out.reserve(addresses.size());
  for (uintptr_t va : addresses) out.push_back(mapping_at_.count(va) != 0);
  return out;
}

void Vmm::register_host(uintptr_t address, size_t size) {
  constexpr size_t kHostPage = 4096;
  if (address == 0 || size == 0 || address % kHostPage != 0 || size % kHostPage != 0) {
    throw std::invalid_argument("host registration needs a non-null, 4 KiB aligned range of whole 4 KiB pages");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto next = host_registrations_.lower_bound(address);
  bool overlaps_next = next != host_registrations_.end() && next->first < address + size;
  bool overlaps_prev = next != host_registrations_.begin() && std::prev(next)->first + std::prev(next)->second > address;
  if (overlaps_next || overlaps_prev) {
    throw std::invalid_argument("host range at " + std::to_string(address) + " overlaps a registered range");
  }
  driver_->register_host(address, size);
  host_registrations_.emplace(address, size);
}

void Vmm::unregister_host(uintptr_t address) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = host_registrations_.find(address);
  if (it == host_registrations_.end()) {
    throw std::invalid_argument("host address " + std::to_string(address) + " is not registered");
  }
  driver_->unregister_host(address);
  host_registrations_.erase(it);
}

VmmStats Vmm::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  VmmStats out = counters_;
  out.pages = pages_.size();
  out.mapped = mapping_at_.size();
  out.resident_bytes = driver_->resident_bytes();
  return out;
}

}  // namespace vmkv
