#include "index.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <unordered_set>
#include <utility>

namespace vmkv::spill {
namespace {

constexpr int kLockTimeoutSeconds = 5;
constexpr uint64_t kDataAlign = 4096;
constexpr uint64_t kSlotAlign = 64;

uint64_t round_up(uint64_t value, uint64_t align) { return (value + align - 1) / align * align; }

uint64_t bucket_of(const uint8_t* key, uint64_t bucket_count) {
  uint64_t word = 0;
  memcpy(&word, key, sizeof(word));  // keys are digests: any 8 bytes are uniform
  return word & (bucket_count - 1);
}

void check_key(const std::string& key) {
  if (key.size() != kKeyBytes) {
    throw std::invalid_argument("a spill key is " + std::to_string(kKeyBytes) + " bytes, got " +
                                std::to_string(key.size()));
  }
}

const uint8_t* key_bytes(const std::string& key) { return reinterpret_cast<const uint8_t*>(key.data()); }

}  // namespace

Geometry geometry_for(uint64_t slot_count, uint64_t slot_bytes) {
  if (slot_count == 0 || slot_bytes == 0) throw std::invalid_argument("a spill tier needs slots of positive size");
  if (slot_count > (uint64_t{1} << 40)) throw std::invalid_argument("too many spill slots");
  if (slot_bytes > (uint64_t{1} << 40)) throw std::invalid_argument("spill slots of over 1 TiB");
  Geometry g{};
  g.slot_count = slot_count;
  g.slot_bytes = slot_bytes;
  g.slot_stride = round_up(slot_bytes, kSlotAlign);
  if (g.slot_stride > (uint64_t{1} << 56) / slot_count) throw std::invalid_argument("a spill tier over 64 PiB");
  g.bucket_count = 16;
  while (g.bucket_count < 2 * slot_count) g.bucket_count <<= 1;
  uint64_t index_bytes = sizeof(Header) + g.bucket_count * sizeof(int64_t) + slot_count * sizeof(Entry);
  g.data_offset = round_up(index_bytes, kDataAlign);
  g.total_bytes = round_up(g.data_offset + slot_count * g.slot_stride, kDataAlign);
  return g;
}

// Locks, repairing first when a holder died, and validates the header before any use.
class Index::Guard {
 public:
  explicit Guard(Index& index)
      : lock_(&index.header_->lock, kLockTimeoutSeconds, "the spill tier",
              [&index] { index.repair_after_owner_death(); }) {
    index.validate_header();
  }

 private:
  shm::RobustGuard lock_;
};

Index::Index(uintptr_t address, size_t size) : header_(reinterpret_cast<Header*>(address)), size_(size) {
  if (address == 0 || size < sizeof(Header)) {
    throw SegmentError("spill segment is " + std::to_string(size) + " bytes: too small for its header");
  }
}

bool Index::initialized() const { return __atomic_load_n(&header_->initialized, __ATOMIC_ACQUIRE) == 1; }

void Index::initialize(const Geometry& g, Policy policy, const std::string& namespace_digest) {
  if (namespace_digest.size() != kNamespaceBytes) throw std::invalid_argument("namespace digest must be 32 bytes");
  if (g.total_bytes > size_) throw std::invalid_argument("spill segment is smaller than its geometry");
  if (static_cast<uint32_t>(policy) > static_cast<uint32_t>(Policy::kLfu)) throw std::invalid_argument("bad policy");
  memset(header_, 0, g.data_offset);
  Header& h = *header_;
  h.magic = kMagic;
  h.version = kVersion;
  h.header_bytes = sizeof(Header);
  h.entry_bytes = sizeof(Entry);
  h.policy = static_cast<uint32_t>(policy);
  h.geometry = g;
  geometry_ = g;
  geometry_known_ = true;
  memcpy(h.namespace_digest, namespace_digest.data(), kNamespaceBytes);
  std::fill_n(buckets(), g.bucket_count, int64_t{-1});
  for (uint64_t i = 0; i < g.slot_count; ++i) entry(static_cast<int64_t>(i)).hash_next = -1;
  shm::init_robust_mutex(&h.lock);
  __atomic_store_n(&h.initialized, 1u, __ATOMIC_RELEASE);
}

void Index::validate_header() const {
  const Header& h = *header_;
  if (h.initialized != 1) throw SegmentError("spill segment is not initialized");
  if (h.magic != kMagic) throw SegmentError("spill segment has a bad magic number: not a vmkv spill tier");
  if (h.version != kVersion) {
    throw SegmentError("spill segment has layout version " + std::to_string(h.version) + "; this vmkv speaks " +
                       std::to_string(kVersion) + ". Stop the instances that use it, then run `vmkv reset`");
  }
  if (h.header_bytes != sizeof(Header) || h.entry_bytes != sizeof(Entry)) {
    throw SegmentError("spill segment has a foreign layout (header/entry sizes differ)");
  }
  if (h.policy > static_cast<uint32_t>(Policy::kLfu)) throw SegmentError("spill segment names an unknown policy");
  Geometry g{};
  try {
    g = geometry_for(h.geometry.slot_count, h.geometry.slot_bytes);
  } catch (const std::invalid_argument& e) {
    throw SegmentError(std::string("spill segment has an impossible geometry: ") + e.what());
  }
  if (memcmp(&g, &h.geometry, sizeof(Geometry)) != 0 || g.total_bytes > size_) {
    throw SegmentError("spill segment's geometry does not match its size");
  }
  if (!geometry_known_) {
    geometry_ = g;
    geometry_known_ = true;
  } else if (memcmp(&g, &geometry_, sizeof(Geometry)) != 0) {
    throw SegmentError("spill segment's geometry changed while in use: it is corrupted; run `vmkv reset`");
  }
}

Header Index::header_copy() {
  Guard guard(*this);
  return *header_;
}

int64_t* Index::buckets() {
  return reinterpret_cast<int64_t*>(reinterpret_cast<uint8_t*>(header_) + sizeof(Header));
}

Entry& Index::entry(int64_t slot) {
  if (slot < 0 || static_cast<uint64_t>(slot) >= geometry_.slot_count) {
    throw SegmentError("spill index is corrupted: slot " + std::to_string(slot) + " out of range; run `vmkv reset`");
  }
  auto* entries = reinterpret_cast<Entry*>(buckets() + geometry_.bucket_count);
  Entry& e = entries[slot];
  if (e.state > kValid || (e.state == kWriting && (e.writer < 0 || e.writer >= static_cast<int32_t>(kMaxProcs)))) {
    throw SegmentError("spill index is corrupted: slot " + std::to_string(slot) + " has state " +
                       std::to_string(e.state) + "; run `vmkv reset`");
  }
  return e;
}

Proc& Index::attached(uint32_t proc) {
  if (proc >= kMaxProcs || header_->procs[proc].pid <= 0) {
    throw std::runtime_error("this process's spill-tier attachment (" + std::to_string(proc) +
                             ") is gone: it was swept as dead or reset");
  }
  if (header_->procs[proc].pid != getpid()) {
    throw std::runtime_error("spill-tier attachment " + std::to_string(proc) + " belongs to pid " +
                             std::to_string(header_->procs[proc].pid));
  }
  return header_->procs[proc];
}

int64_t Index::find(const uint8_t* key) {
  int64_t slot = buckets()[bucket_of(key, geometry_.bucket_count)];
  for (uint64_t steps = 0; slot != -1; ++steps) {
    if (steps > geometry_.slot_count) throw SegmentError("spill index is corrupted: a hash chain loops");
    Entry& e = entry(slot);
    if (e.state != kFree && memcmp(e.key, key, kKeyBytes) == 0) return slot;
    slot = e.hash_next;
  }
  return -1;
}

void Index::link(int64_t slot) {
  Entry& e = entry(slot);
  int64_t& head = buckets()[bucket_of(e.key, geometry_.bucket_count)];
  e.hash_next = head;
  head = slot;
}

void Index::unlink(int64_t slot) {
  Entry& e = entry(slot);
  int64_t* link = &buckets()[bucket_of(e.key, geometry_.bucket_count)];
  for (uint64_t steps = 0; *link != -1; ++steps) {
    if (steps > geometry_.slot_count) throw SegmentError("spill index is corrupted: a hash chain loops");
    if (*link == slot) {
      *link = e.hash_next;
      e.hash_next = -1;
      return;
    }
    link = &entry(*link).hash_next;
  }
}

void Index::touch(Entry& e) {
  e.last_use = ++header_->tick;
  ++e.uses;
}

uint64_t Index::rank(const Entry& e) const {
  switch (static_cast<Policy>(header_->policy)) {
    case Policy::kFifo:
      return e.inserted;
    case Policy::kLfu:  // fewest hits first; among equals, least recently used
      return (std::min<uint64_t>(e.uses, 0xffff) << 48) | (e.last_use & ((uint64_t{1} << 48) - 1));
    case Policy::kLru:
      break;
  }
  return e.last_use;
}

void Index::rebuild_chains() {
  std::fill_n(buckets(), geometry_.bucket_count, int64_t{-1});
  for (uint64_t i = 0; i < geometry_.slot_count; ++i) {
    Entry& e = entry(static_cast<int64_t>(i));
    e.hash_next = -1;
    if (e.state != kFree) link(static_cast<int64_t>(i));
  }
}

// The dead holder may have been anywhere in an update. Entries are the truth (their state
// is written last), so the chains are rebuilt from them; then the dead are swept.
void Index::repair_after_owner_death() {
  validate_header();
  ++header_->counters.lock_recoveries;
  rebuild_chains();
  sweep_locked();
}

void Index::release_proc(uint32_t proc) {
  uint64_t bit = uint64_t{1} << proc;
  for (uint64_t i = 0; i < geometry_.slot_count; ++i) {
    Entry& e = entry(static_cast<int64_t>(i));
    e.readers &= ~bit;
    if (e.state == kWriting && e.writer == static_cast<int32_t>(proc)) {
      unlink(static_cast<int64_t>(i));
      e.state = kFree;
      ++header_->counters.aborted;
    }
  }
  header_->procs[proc] = Proc{};
}

uint64_t Index::sweep_locked() {
  uint64_t dead = 0;
  for (uint32_t p = 0; p < kMaxProcs; ++p) {
    const Proc& proc = header_->procs[p];
    if (proc.pid != 0 && !shm::process_alive(proc.pid, proc.start_time)) {
      release_proc(p);
      ++dead;
    }
  }
  return dead;
}

uint64_t Index::sweep() {
  Guard guard(*this);
  return sweep_locked();
}

uint32_t Index::attach(int32_t pid) {
  uint64_t start_time = shm::process_start_time(pid);
  if (start_time == 0) throw std::invalid_argument("pid " + std::to_string(pid) + " is not a running process");
  Guard guard(*this);
  sweep_locked();
  for (uint32_t p = 0; p < kMaxProcs; ++p) {
    Proc& proc = header_->procs[p];
    if (proc.pid == 0) {
      proc.start_time = start_time;
      proc.pid = pid;
      return p;
    }
  }
  throw std::runtime_error("the spill tier already has " + std::to_string(kMaxProcs) + " processes attached");
}

uint32_t Index::detach(uint32_t proc) {
  Guard guard(*this);
  attached(proc);
  release_proc(proc);
  uint32_t remaining = 0;
  for (const Proc& p : header_->procs) remaining += p.pid != 0 && shm::process_alive(p.pid, p.start_time);
  return remaining;
}

std::optional<std::vector<int64_t>> Index::reserve(uint32_t proc, const std::vector<std::string>& keys) {
  for (const std::string& key : keys) check_key(key);
  Guard guard(*this);
  attached(proc);
  std::vector<int64_t> result(keys.size(), -1);
  std::vector<size_t> wanted;  // positions of keys that need a slot
  std::vector<bool> keep(geometry_.slot_count, false);  // present keys are never victims
  std::unordered_set<std::string_view> seen;
  seen.reserve(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    int64_t slot = find(key_bytes(keys[i]));
    if (slot >= 0) {
      keep[slot] = true;
    } else if (seen.insert(keys[i]).second) {
      wanted.push_back(i);
    }
  }
  if (wanted.empty()) return result;

  for (int attempt = 0; attempt < 2; ++attempt) {
    std::vector<int64_t> free_slots;
    std::vector<std::pair<uint64_t, int64_t>> evictable;
    for (uint64_t i = 0; i < geometry_.slot_count && free_slots.size() < wanted.size(); ++i) {
      const Entry& e = entry(static_cast<int64_t>(i));
      if (e.state == kFree) free_slots.push_back(static_cast<int64_t>(i));
    }
    if (free_slots.size() < wanted.size()) {
      for (uint64_t i = 0; i < geometry_.slot_count; ++i) {
        const Entry& e = entry(static_cast<int64_t>(i));
        if (e.state == kValid && e.readers == 0 && !keep[i]) evictable.emplace_back(rank(e), static_cast<int64_t>(i));
      }
      size_t short_by = wanted.size() - free_slots.size();
      if (evictable.size() < short_by) {
        if (attempt == 0 && sweep_locked() > 0) continue;  // a dead process may have held slots
        return std::nullopt;
      }
      std::partial_sort(evictable.begin(), evictable.begin() + short_by, evictable.end());
      for (size_t v = 0; v < short_by; ++v) {
        int64_t victim = evictable[v].second;
        unlink(victim);
        entry(victim).state = kFree;
        ++header_->counters.evictions;
        free_slots.push_back(victim);
      }
    }
    std::sort(free_slots.begin(), free_slots.end());  // ascending slots make longer copy runs
    for (size_t n = 0; n < wanted.size(); ++n) {
      int64_t slot = free_slots[n];
      Entry& e = entry(slot);
      memcpy(e.key, keys[wanted[n]].data(), kKeyBytes);
      e.writer = static_cast<int32_t>(proc);
      e.readers = 0;
      e.uses = 0;
      e.state = kWriting;  // last: a repair trusts entries whose state is set
      link(slot);
      result[wanted[n]] = slot;
    }
    return result;
  }
  return std::nullopt;
}

void Index::check_writing(uint32_t proc, const std::vector<int64_t>& slots) {
  attached(proc);
  for (int64_t slot : slots) {
    const Entry& e = entry(slot);
    if (e.state != kWriting || e.writer != static_cast<int32_t>(proc)) {
      throw std::invalid_argument("slot " + std::to_string(slot) + " is not being written by this process");
    }
  }
}

void Index::commit(uint32_t proc, const std::vector<int64_t>& slots) {
  Guard guard(*this);
  check_writing(proc, slots);
  for (int64_t slot : slots) {
    Entry& e = entry(slot);
    e.inserted = e.last_use = ++header_->tick;
    e.state = kValid;
    ++header_->counters.stored;
  }
}

void Index::abort(uint32_t proc, const std::vector<int64_t>& slots) {
  Guard guard(*this);
  check_writing(proc, slots);
  for (int64_t slot : slots) {
    unlink(slot);
    entry(slot).state = kFree;
    ++header_->counters.aborted;
  }
}

uint64_t Index::lookup(const std::vector<std::string>& keys) {
  for (const std::string& key : keys) check_key(key);
  Guard guard(*this);
  uint64_t hits = 0;
  for (const std::string& key : keys) {
    int64_t slot = find(key_bytes(key));
    if (slot < 0 || entry(slot).state != kValid) {
      ++header_->counters.misses;
      break;
    }
    touch(entry(slot));
    ++hits;
  }
  header_->counters.hits += hits;
  return hits;
}

std::vector<int64_t> Index::pin(uint32_t proc, const std::vector<std::string>& keys, int64_t* missing) {
  for (const std::string& key : keys) check_key(key);
  Guard guard(*this);
  attached(proc);
  std::vector<int64_t> slots;
  slots.reserve(keys.size());
  *missing = -1;
  for (size_t i = 0; i < keys.size(); ++i) {
    int64_t slot = find(key_bytes(keys[i]));
    if (slot < 0 || entry(slot).state != kValid) {
      *missing = static_cast<int64_t>(i);
      return {};
    }
    slots.push_back(slot);
  }
  for (int64_t slot : slots) {
    Entry& e = entry(slot);
    e.readers |= uint64_t{1} << proc;
    touch(e);
  }
  header_->counters.retrieves += slots.size();
  return slots;
}

void Index::unpin(uint32_t proc, const std::vector<int64_t>& slots) {
  Guard guard(*this);
  attached(proc);
  uint64_t bit = uint64_t{1} << proc;
  for (int64_t slot : slots) {
    if (!(entry(slot).readers & bit)) {
      throw std::invalid_argument("slot " + std::to_string(slot) + " is not pinned by this process");
    }
  }
  for (int64_t slot : slots) entry(slot).readers &= ~bit;
}

int Index::state(const std::string& key) {
  check_key(key);
  Guard guard(*this);
  int64_t slot = find(key_bytes(key));
  return slot < 0 ? -1 : static_cast<int>(entry(slot).state);
}

Stats Index::stats() {
  Guard guard(*this);
  const Header& h = *header_;
  Stats s{};
  s.geometry = geometry_;
  s.counters = h.counters;
  for (uint64_t i = 0; i < geometry_.slot_count; ++i) {
    const Entry& e = entry(static_cast<int64_t>(i));
    s.valid += e.state == kValid;
    s.writing += e.state == kWriting;
    s.free += e.state == kFree;
    s.pinned += e.readers != 0;
  }
  for (const Proc& p : h.procs) s.attached += p.pid != 0;
  return s;
}

}  // namespace vmkv::spill
