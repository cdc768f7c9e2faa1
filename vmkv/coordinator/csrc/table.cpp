#include "table.h"

#include <algorithm>
#include <cstring>

namespace vmkv::coord {
namespace {

constexpr int kLockTimeoutSeconds = 5;

// The first control byte (NUL included) in text[0, size), or -1.
int control_byte(const char* text, size_t size) {
  for (size_t i = 0; i < size; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) return c;
  }
  return -1;
}

void check_text(const std::string& value, size_t capacity, const char* what) {
  if (value.empty() || value.size() >= capacity) {
    throw std::invalid_argument(std::string(what) + " must be 1 to " + std::to_string(capacity - 1) +
                                " bytes, got " + std::to_string(value.size()));
  }
  // A newline or escape in a name would forge lines in `vmkv ls` and the metrics.
  if (const int c = control_byte(value.data(), value.size()); c >= 0) {
    throw std::invalid_argument(std::string(what) + " must be printable; it holds the control byte " +
                                std::to_string(c));
  }
}

bool terminated(const char* text, size_t capacity) { return memchr(text, '\0', capacity) != nullptr; }

void record(Histogram& histogram, uint64_t ns) {
  int bucket = 0;
  while (bucket < kBuckets - 1 && ns > kBucketBoundsNs[bucket]) ++bucket;
  ++histogram.counts[bucket];
  histogram.sum_ns += ns;
}

std::string slot_label(uint32_t index, const Slot& s) {
  return "slot " + std::to_string(index) + " (pid " + std::to_string(s.pid) + ")";
}

}  // namespace

// Takes the robust lock with a deadline. When the previous owner died holding it, the
// table is repaired before anyone reads it: every update is a few 8-byte stores and every
// aggregate is recomputed from the slots, so repair = validate + sweep the dead.
class Table::Guard {
 public:
  explicit Guard(Table& table)
      : lock_(&table.segment_->header.lock, kLockTimeoutSeconds, "the coordinator",
              [&table] { table.repair_after_owner_death(); }) {
    table.validate_header();
    table.validate_slots();
  }

 private:
  shm::RobustGuard lock_;
};

Table::Table(uintptr_t address, size_t size) : segment_(reinterpret_cast<Segment*>(address)) {
  if (address == 0 || size < sizeof(Segment)) {
    throw SegmentError("coordinator segment is " + std::to_string(size) + " bytes, expected " +
                       std::to_string(sizeof(Segment)));
  }
}

bool Table::initialized() const { return __atomic_load_n(&segment_->header.initialized, __ATOMIC_ACQUIRE) == 1; }

void Table::initialize(uint64_t page_size, uint64_t budget_pages) {
  if (page_size == 0 || budget_pages == 0) throw std::invalid_argument("page size and budget must be positive");
  if (budget_pages > kMaxBudgetPages) throw std::invalid_argument("a budget of over 2**40 pages");
  memset(segment_, 0, sizeof(Segment));
  Header& h = segment_->header;
  h.magic = kMagic;
  h.version = kVersion;
  h.header_bytes = sizeof(Header);
  h.slot_bytes = sizeof(Slot);
  h.max_slots = kMaxSlots;
  h.page_size = page_size;
  h.budget_pages = budget_pages;
  h.next_generation = 1;
  shm::init_robust_mutex(&h.lock);
  __atomic_store_n(&h.initialized, 1u, __ATOMIC_RELEASE);
}

uint64_t Table::page_size() const {
  validate_header();
  return segment_->header.page_size;
}

void Table::validate_header() const {
  const Header& h = segment_->header;
  if (h.initialized != 1) throw SegmentError("coordinator segment is not initialized");
  if (h.magic != kMagic) throw SegmentError("coordinator segment has a bad magic number: not a vmkv segment");
  if (h.version != kVersion) {
    throw SegmentError("coordinator segment has layout version " + std::to_string(h.version) +
                       "; this vmkv speaks version " + std::to_string(kVersion) +
                       ". Stop the instances that use it, then run `vmkv reset`");
  }
  if (h.header_bytes != sizeof(Header) || h.slot_bytes != sizeof(Slot) || h.max_slots != kMaxSlots) {
    throw SegmentError("coordinator segment has a foreign layout (header/slot sizes differ)");
  }
  if (h.page_size == 0 || h.budget_pages == 0) throw SegmentError("coordinator segment has a zero page size or budget");
  if (h.budget_pages > kMaxBudgetPages || h.next_generation > kMaxGeneration) {
    throw SegmentError("coordinator segment is corrupted: its budget or generation counter is out of range");
  }
}

void Table::validate_slots() const {
  const Header& h = segment_->header;
  uint64_t total = 0;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& s = segment_->slots[i];
    if (s.state == kFree) continue;
    std::string where = "coordinator segment is corrupted: " + slot_label(i, s);
    if (s.state != kActive) throw SegmentError(where + " has state " + std::to_string(s.state));
    if (s.pid <= 0) throw SegmentError(where + " has no valid pid");
    if (!terminated(s.name, kNameBytes) || !terminated(s.engine, kEngineBytes) || !terminated(s.model, kModelBytes)) {
      throw SegmentError(where + " has an unterminated name");
    }
    if (control_byte(s.name, strnlen(s.name, kNameBytes)) >= 0 ||
        control_byte(s.engine, strnlen(s.engine, kEngineBytes)) >= 0 ||
        control_byte(s.model, strnlen(s.model, kModelBytes)) >= 0) {
      throw SegmentError(where + " has a name with control bytes");
    }
    if (s.weight == 0 || s.weight > kMaxWeight) {
      throw SegmentError(where + " has weight " + std::to_string(s.weight));
    }
    if (s.min_pages > s.max_pages) throw SegmentError(where + " has min > max");
    if (s.leased > h.budget_pages || s.awaiting > h.budget_pages) {
      throw SegmentError(where + " leases or awaits more pages than the budget");
    }
    if (s.generation == 0 || s.generation >= h.next_generation) throw SegmentError(where + " has a bad generation");
    total += s.leased;
  }
  if (total > h.budget_pages) throw SegmentError("coordinator segment is corrupted: leases exceed the budget");
}

void Table::repair_after_owner_death() {
  ++segment_->header.lock_recoveries;
  sweep_locked();
  for (Slot& s : segment_->slots) {
    if (s.state == kActive) s.reclaim_request = std::min(s.reclaim_request, s.leased);
  }
}

Slot& Table::owned(uint32_t slot, uint64_t generation) {
  if (slot >= kMaxSlots) throw std::invalid_argument("slot " + std::to_string(slot) + " out of range");
  Slot& s = segment_->slots[slot];
  if (s.state != kActive || s.generation != generation) {
    throw std::runtime_error("this instance's registration (slot " + std::to_string(slot) +
                             ") is gone: it was reclaimed as dead or reset");
  }
  return s;
}

uint64_t Table::available_to(uint32_t slot) const {
  uint64_t taken = 0;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& s = segment_->slots[i];
    if (s.state == kActive) taken += s.leased + (i == slot ? 0 : s.awaiting);
  }
  uint64_t budget = segment_->header.budget_pages;
  return budget > taken ? budget - taken : 0;
}

uint64_t Table::leased_total() const {
  uint64_t total = 0;
  for (const Slot& s : segment_->slots) {
    if (s.state == kActive) total += s.leased;
  }
  return total;
}

// Weighted shares of the budget, water-filled so that what an instance cannot use above
// its max goes to the others, then raised to each instance's guaranteed min.
std::vector<uint64_t> Table::fair_shares() const {
  std::vector<uint64_t> fair(kMaxSlots, 0);
  std::vector<uint32_t> open;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    if (segment_->slots[i].state == kActive) open.push_back(i);
  }
  double remaining = static_cast<double>(segment_->header.budget_pages);
  while (!open.empty()) {
    double weights = 0;
    for (uint32_t i : open) weights += segment_->slots[i].weight;
    std::vector<uint32_t> next;
    for (uint32_t i : open) {
      const Slot& s = segment_->slots[i];
      double share = remaining * s.weight / weights;
      if (share >= static_cast<double>(s.max_pages)) {
        fair[i] = s.max_pages;
      } else {
        next.push_back(i);
      }
    }
    if (next.size() == open.size()) {
      for (uint32_t i : open) fair[i] = static_cast<uint64_t>(remaining * segment_->slots[i].weight / weights);
      break;
    }
    for (uint32_t i : open) {
      if (std::find(next.begin(), next.end(), i) == next.end()) remaining -= static_cast<double>(fair[i]);
    }
    open.swap(next);
  }
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& s = segment_->slots[i];
    if (s.state == kActive) fair[i] = std::max(fair[i], s.min_pages);
  }
  return fair;
}

std::vector<uint32_t> Table::sweep_locked() {
  std::vector<uint32_t> reclaimed;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    Slot& s = segment_->slots[i];
    if (s.state == kActive && !process_alive(s.pid, s.start_time)) {
      s.state = kFree;  // its lease leaves the sum with it
      reclaimed.push_back(i);
    }
  }
  return reclaimed;
}

std::pair<uint32_t, uint64_t> Table::register_instance(const std::string& name, const std::string& engine,
                                                       const std::string& model, uint64_t min_pages,
                                                       uint64_t max_pages, uint32_t weight, int32_t pid) {
  check_text(name, kNameBytes, "name");
  check_text(engine, kEngineBytes, "engine");
  check_text(model, kModelBytes, "model");
  if (weight == 0 || weight > kMaxWeight) {
    throw std::invalid_argument("weight must be 1 to " + std::to_string(kMaxWeight) + ", got " +
                                std::to_string(weight));
  }
  if (min_pages > max_pages) throw std::invalid_argument("min must not exceed max");
  uint64_t start_time = process_start_time(pid);
  if (start_time == 0) throw std::invalid_argument("pid " + std::to_string(pid) + " is not a running process");
  Guard guard(*this);
  sweep_locked();
  uint64_t mins = min_pages;
  int free_slot = -1;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& s = segment_->slots[i];
    if (s.state == kActive) {
      if (strncmp(s.name, name.c_str(), kNameBytes) == 0) {
        throw std::invalid_argument("an instance named '" + name + "' is already registered (pid " +
                                    std::to_string(s.pid) + ")");
      }
      mins += s.min_pages;
    } else if (free_slot < 0) {
      free_slot = static_cast<int>(i);
    }
  }
  if (free_slot < 0) throw std::runtime_error("all " + std::to_string(kMaxSlots) + " coordinator slots are in use");
  if (mins > segment_->header.budget_pages) {
    throw std::invalid_argument("the guaranteed minimums would exceed the budget of " +
                                std::to_string(segment_->header.budget_pages) + " pages");
  }
  Slot& s = segment_->slots[free_slot];
  memset(&s, 0, sizeof(Slot));
  s.pid = pid;
  s.start_time = start_time;
  s.generation = segment_->header.next_generation++;
  memcpy(s.name, name.c_str(), name.size());
  memcpy(s.engine, engine.c_str(), engine.size());
  memcpy(s.model, model.c_str(), model.size());
  s.min_pages = min_pages;
  s.max_pages = max_pages;
  s.weight = weight;
  s.heartbeat_ns = monotonic_ns();
  __atomic_store_n(&s.state, static_cast<uint32_t>(kActive), __ATOMIC_RELEASE);  // last: a crash before it leaves the slot free
  return {static_cast<uint32_t>(free_slot), s.generation};
}

void Table::deregister(uint32_t slot, uint64_t generation) {
  Guard guard(*this);
  owned(slot, generation).state = kFree;
}

void Table::grant_locked(Slot& s, uint64_t pages, uint64_t waited_ns, uint64_t started_ns) {
  s.leased += pages;
  s.awaiting = 0;
  ++s.grants;
  record(s.grant_latency, waited_ns + (monotonic_ns() - started_ns));
}

RequestResult Table::request(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t waited_ns) {
  uint64_t started = monotonic_ns();
  if (pages == 0) throw std::invalid_argument("a lease request needs at least one page");
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  if (s.leased + pages > s.max_pages) {
    ++s.misses;
    return {Outcome::kMissMax, {}};
  }
  if (s.reclaim_request > 0) {
    // It owes pages others wait for: taking free budget now would take it from them, and
    // it would pay its debt only to lease the pages back. It grows again once it has paid.
    ++s.misses;
    return {Outcome::kMissOwing, {}};
  }
  if (available_to(slot) < pages) sweep_locked();
  uint64_t available = available_to(slot);
  if (available >= pages) {
    grant_locked(s, pages, waited_ns, started);
    return {Outcome::kGranted, {}};
  }
  // Whom to ask, in tiers:
  //   0. anyone's idle pages (pooled or empty, as last reported): giving them costs the
  //      holder nothing, so any requester may have them, whatever the shares;
  //   1. if the requester stays within its fair share: what others hold above theirs;
  //   2. if the requester is below its min: what others hold above their min.
  std::vector<uint64_t> fair = fair_shares();
  bool within_fair = s.leased + pages <= fair[slot];
  bool below_min = s.leased + pages <= s.min_pages;
  uint64_t need = pages - available;
  std::vector<uint32_t> victims;
  // Pages others already promised and other waiters have not claimed are on their way
  // (a requester asks again after a miss): ring their holders, ask nobody for them twice.
  uint64_t promised = 0, claimed = 0;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& v = segment_->slots[i];
    if (i == slot || v.state != kActive) continue;
    promised += std::min(v.reclaim_request, v.leased);
    claimed += v.awaiting;
    if (v.reclaim_request > 0) victims.push_back(i);
  }
  need -= std::min(need, promised > claimed ? promised - claimed : 0);
  for (int tier = 0; tier < 3 && need > 0; ++tier) {
    if ((tier == 1 && !within_fair) || (tier == 2 && !below_min)) break;
    std::vector<std::pair<uint64_t, uint32_t>> offers;
    for (uint32_t i = 0; i < kMaxSlots; ++i) {
      Slot& v = segment_->slots[i];
      if (i == slot || v.state != kActive || v.leased <= v.reclaim_request) continue;
      uint64_t spare = v.leased - v.reclaim_request;  // what is not already promised
      // Pooled pages (held, not mapped) are reported at once; the rest of what it could
      // give back comes with its heartbeat.
      uint64_t idle = std::max(v.reclaimable, v.held - v.mapped);
      uint64_t offer = tier == 0   ? std::min(idle, spare)
                       : tier == 1 ? (spare > fair[i] ? spare - fair[i] : 0)
                                   : (spare > v.min_pages ? spare - v.min_pages : 0);
      if (offer > 0) offers.emplace_back(offer, i);
    }
    std::sort(offers.rbegin(), offers.rend());
    for (const auto& [amount, i] : offers) {
      if (need == 0) break;
      uint64_t take = std::min(amount, need);
      Slot& v = segment_->slots[i];
      if (v.reclaim_request == 0) v.reclaim_since_ns = monotonic_ns();
      v.reclaim_request += take;
      v.reclaimable -= std::min(v.reclaimable, take);
      need -= take;
      if (std::find(victims.begin(), victims.end(), i) == victims.end()) victims.push_back(i);
    }
  }
  if (victims.empty() && s.awaiting == 0) {
    ++s.misses;
    return {within_fair ? Outcome::kMissNoVictim : Outcome::kMissFair, {}};
  }
  s.awaiting = pages;  // what others free now goes to this request first
  return {Outcome::kReclaiming, victims};
}

bool Table::try_grant(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t waited_ns) {
  uint64_t started = monotonic_ns();
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  if (s.leased + pages > s.max_pages || available_to(slot) < pages) return false;
  grant_locked(s, pages, waited_ns, started);
  return true;
}

void Table::note_miss(uint32_t slot, uint64_t generation, uint64_t waited_ns) {
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  ++s.misses;
  s.awaiting = 0;
  record(s.grant_latency, waited_ns);
}

void Table::release(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t held, uint64_t mapped) {
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  if (pages > s.leased) {
    throw std::invalid_argument("cannot release " + std::to_string(pages) + " pages: only " +
                                std::to_string(s.leased) + " are leased");
  }
  if (held > s.leased - pages || mapped > held) {
    throw std::invalid_argument("holding " + std::to_string(held) + " pages (" + std::to_string(mapped) +
                                " mapped) is not covered by the remaining lease");
  }
  s.leased -= pages;
  s.held = held;
  s.mapped = mapped;
  if (s.reclaim_request > 0) {  // what it gives back pays what it was asked for
    s.reclaim_request -= std::min(pages, s.reclaim_request);
    if (s.reclaim_request == 0) {
      record(s.reclaim_latency, monotonic_ns() - s.reclaim_since_ns);
      s.reclaim_since_ns = 0;
    }
  }
}

void Table::report(uint32_t slot, uint64_t generation, uint64_t held, uint64_t mapped) {
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  if (held > s.leased || mapped > held) {
    throw std::invalid_argument("holding " + std::to_string(held) + " pages (" + std::to_string(mapped) +
                                " mapped) is not covered by a lease of " + std::to_string(s.leased));
  }
  s.held = held;
  s.mapped = mapped;
}

uint64_t Table::heartbeat(uint32_t slot, uint64_t generation, uint64_t reclaimable, uint64_t owed) {
  Guard guard(*this);
  sweep_locked();
  Slot& s = owned(slot, generation);
  s.heartbeat_ns = monotonic_ns();
  s.reclaimable = reclaimable;
  // A lowered max is a standing request to shrink, even when nobody else is asking.
  uint64_t over_max = s.leased > s.max_pages ? s.leased - s.max_pages : 0;
  if (over_max > s.reclaim_request) {
    if (s.reclaim_request == 0) s.reclaim_since_ns = monotonic_ns();
    s.reclaim_request = over_max;
  }
  uint64_t asked = std::min(s.reclaim_request, s.leased);
  return asked - std::min(owed, asked);
}

void Table::finish_reclaim(uint32_t slot, uint64_t generation, uint64_t released, uint64_t refused) {
  Guard guard(*this);
  Slot& s = owned(slot, generation);
  if (refused > 0 && s.reclaim_request > 0) {  // more than it could ever give back
    s.reclaim_request -= std::min(refused, s.reclaim_request);
    if (s.reclaim_request == 0) s.reclaim_since_ns = 0;
  }
  if (released > 0) {
    ++s.reclaims;
    s.reclaimed_pages += released;
  }
}

int64_t Table::set_limits(const std::string& name, int64_t min_pages, int64_t max_pages, int64_t weight) {
  Guard guard(*this);
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    Slot& s = segment_->slots[i];
    if (s.state != kActive || strncmp(s.name, name.c_str(), kNameBytes) != 0) continue;
    uint64_t new_min = min_pages >= 0 ? static_cast<uint64_t>(min_pages) : s.min_pages;
    uint64_t new_max = max_pages >= 0 ? static_cast<uint64_t>(max_pages) : s.max_pages;
    uint64_t new_weight = weight >= 0 ? static_cast<uint64_t>(weight) : s.weight;
    if (new_min > new_max) throw std::invalid_argument("min must not exceed max");
    if (new_weight == 0 || new_weight > kMaxWeight) {
      throw std::invalid_argument("weight must be 1 to " + std::to_string(kMaxWeight));
    }
    uint64_t mins = new_min;
    for (uint32_t j = 0; j < kMaxSlots; ++j) {
      if (j != i && segment_->slots[j].state == kActive) mins += segment_->slots[j].min_pages;
    }
    if (mins > segment_->header.budget_pages) {
      throw std::invalid_argument("the guaranteed minimums would exceed the budget");
    }
    s.min_pages = new_min;
    s.max_pages = new_max;
    s.weight = static_cast<uint32_t>(new_weight);
    if (s.leased > new_max && s.reclaim_request < s.leased - new_max) {
      if (s.reclaim_request == 0) s.reclaim_since_ns = monotonic_ns();
      s.reclaim_request = s.leased - new_max;
    }
    return i;
  }
  throw std::invalid_argument("no live instance is named '" + name + "'");
}

void Table::set_budget(uint64_t budget_pages) {
  if (budget_pages == 0) throw std::invalid_argument("the budget must be positive");
  if (budget_pages > kMaxBudgetPages) throw std::invalid_argument("a budget of over 2**40 pages");
  Guard guard(*this);
  uint64_t mins = 0;
  for (const Slot& s : segment_->slots) {
    if (s.state == kActive) mins += s.min_pages;
  }
  if (budget_pages < std::max(mins, leased_total())) {
    throw std::invalid_argument("the budget cannot go below what is leased or guaranteed now");
  }
  segment_->header.budget_pages = budget_pages;
}

std::vector<uint32_t> Table::sweep() {
  Guard guard(*this);
  return sweep_locked();
}

std::vector<SlotView> Table::snapshot() {
  Guard guard(*this);
  std::vector<uint64_t> fair = fair_shares();
  std::vector<SlotView> out;
  for (uint32_t i = 0; i < kMaxSlots; ++i) {
    const Slot& s = segment_->slots[i];
    if (s.state == kActive) out.push_back({i, s, fair[i], process_alive(s.pid, s.start_time)});
  }
  return out;
}

Header Table::header_copy() {
  Guard guard(*this);
  return segment_->header;
}

uint64_t Table::headroom(uint32_t slot, uint64_t generation) {
  Guard guard(*this);
  const Slot& s = owned(slot, generation);
  if (s.reclaim_request > 0) return 0;  // see request: no growth while it owes
  uint64_t below_max = s.max_pages > s.leased ? s.max_pages - s.leased : 0;
  return std::min(available_to(slot), below_max);
}

void Table::lock_unlock() { Guard guard(*this); }

void Table::lock_cycles(uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) Guard guard(*this);
}

}  // namespace vmkv::coord
