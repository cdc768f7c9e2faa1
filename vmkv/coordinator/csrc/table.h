// The coordinator's shared table: one fixed-layout segment per user and device, guarded
// by a process-shared robust mutex, so no daemon is needed and a process killed at any
// instruction (lock held or not) never blocks the others.
//
// Every value read from the segment is validated under the lock before it is used; a
// segment that fails validation is reported, never trusted.
#pragma once

#include <pthread.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "process.h"
#include "robust_lock.h"

namespace vmkv::coord {

constexpr uint64_t kMagic = 0x524f4f43564b4d56ULL;  // "VMKVCOOR" little-endian
constexpr uint32_t kVersion = 2;  // 2: releases pay reclaim requests down; heartbeats subtract debt
constexpr uint32_t kMaxSlots = 64;
constexpr size_t kNameBytes = 64;
constexpr size_t kEngineBytes = 32;
constexpr size_t kModelBytes = 128;
constexpr uint32_t kMaxWeight = 1000000;
constexpr uint64_t kMaxBudgetPages = uint64_t{1} << 40;  // sums of leases stay far from overflow
constexpr uint64_t kMaxGeneration = uint64_t{1} << 62;
constexpr int kBuckets = 15;
// Upper bounds of the latency buckets in ns; the last bucket is +Inf.
constexpr uint64_t kBucketBoundsNs[kBuckets - 1] = {1000,    2000,    5000,    10000,   20000,    50000,   100000,
                                                     200000,  500000,  1000000, 2000000, 5000000, 10000000, 50000000};

enum SlotState : uint32_t { kFree = 0, kActive = 2 };

struct Histogram {
  uint64_t counts[kBuckets];
  uint64_t sum_ns;
};

struct Slot {
  uint32_t state;
  int32_t pid;
  uint64_t start_time;  // /proc/<pid>/stat field 22: tells a reused pid from the original
  uint64_t generation;  // unique per registration; a stale handle cannot touch a reused slot
  char name[kNameBytes];
  char engine[kEngineBytes];
  char model[kModelBytes];
  uint64_t min_pages;
  uint64_t max_pages;
  uint32_t weight;
  uint32_t reserved0;
  uint64_t leased;       // pages granted: counts against the budget
  uint64_t held;         // physical pages the instance holds (mapped or pooled)
  uint64_t mapped;       // of those, mapped into KV spaces
  uint64_t reclaimable;  // pages it could give back without touching live blocks
  uint64_t heartbeat_ns;
  uint64_t awaiting;          // pages it waits for after asking others: reserved for it as they free
  uint64_t reclaim_request;   // pages others asked it to give back and it has not released yet
  uint64_t reclaim_since_ns;  // when the oldest pending request was made
  uint64_t grants;
  uint64_t misses;
  uint64_t reclaims;
  uint64_t reclaimed_pages;
  Histogram grant_latency;
  Histogram reclaim_latency;
};

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t header_bytes;
  uint32_t slot_bytes;
  uint32_t max_slots;
  uint64_t page_size;
  uint64_t budget_pages;
  uint64_t next_generation;
  uint64_t lock_recoveries;  // times a lock holder died and the table was repaired
  uint32_t initialized;
  uint32_t reserved0;
  pthread_mutex_t lock;
};

struct Segment {
  Header header;
  Slot slots[kMaxSlots];
};

using shm::monotonic_ns;
using shm::process_alive;
using shm::process_start_time;
using shm::SegmentError;  // the segment failed validation (bad magic, foreign version, impossible values)

enum class Outcome : int {
  kGranted = 0,
  kMissMax = 1,
  kMissFair = 2,
  kMissNoVictim = 3,
  kReclaiming = 4,
  kMissOwing = 5,  // it owes pages others asked for: it may not grow until it has paid
};

struct RequestResult {
  Outcome outcome;
  std::vector<uint32_t> victims;  // slots asked to give pages back (ring their doorbells)
};

struct SlotView {
  uint32_t index;
  Slot slot;
  uint64_t fair_pages;
  bool alive;
};

class Table {
 public:
  Table(uintptr_t address, size_t size);

  static size_t segment_size() { return sizeof(Segment); }
  bool initialized() const;
  void initialize(uint64_t page_size, uint64_t budget_pages);
  uint64_t page_size() const;

  // Registration returns (slot, generation); every later call names both.
  std::pair<uint32_t, uint64_t> register_instance(const std::string& name, const std::string& engine,
                                                  const std::string& model, uint64_t min_pages, uint64_t max_pages,
                                                  uint32_t weight, int32_t pid);
  void deregister(uint32_t slot, uint64_t generation);

  // The lease protocol. `waited_ns` is time already spent on this request (for latency).
  RequestResult request(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t waited_ns);
  bool try_grant(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t waited_ns);
  void note_miss(uint32_t slot, uint64_t generation, uint64_t waited_ns);
  // Pages a request could be granted right now from free budget, without asking anyone
  // (what an engine may count as free blocks beyond the ones it has mapped).
  uint64_t headroom(uint32_t slot, uint64_t generation);
  // Releases lease and records the holdings that remain, in one step, so that the table
  // never shows more pages held than leased.
  void release(uint32_t slot, uint64_t generation, uint64_t pages, uint64_t held, uint64_t mapped);
  void report(uint32_t slot, uint64_t generation, uint64_t held, uint64_t mapped);

  // The holder's side of reclaim. A heartbeat returns what is asked of the instance
  // beyond what it already owes (``owed``: promised earlier, paid as its pages free);
  // every release pays the request down, so an ask is never counted twice.
  // finish_reclaim records what one round released, and drops what the instance refused
  // (it holds no more that it could give back).
  uint64_t heartbeat(uint32_t slot, uint64_t generation, uint64_t reclaimable, uint64_t owed);
  void finish_reclaim(uint32_t slot, uint64_t generation, uint64_t released, uint64_t refused);

  // Administration. set_limits returns the slot to ring when the change needs action.
  int64_t set_limits(const std::string& name, int64_t min_pages, int64_t max_pages, int64_t weight);
  void set_budget(uint64_t budget_pages);
  std::vector<uint32_t> sweep();
  std::vector<SlotView> snapshot();
  Header header_copy();
  void lock_unlock();  // the floor for benchmarks: a bare acquire/release
  void lock_cycles(uint64_t count);  // `count` bare acquire/release pairs, without Python in between

 private:
  class Guard;
  Slot& owned(uint32_t slot, uint64_t generation);
  void validate_header() const;
  void validate_slots() const;
  void repair_after_owner_death();
  uint64_t leased_total() const;
  // Budget this slot may take now: free pages not reserved for another waiting requester.
  uint64_t available_to(uint32_t slot) const;
  std::vector<uint64_t> fair_shares() const;
  std::vector<uint32_t> sweep_locked();
  void grant_locked(Slot& s, uint64_t pages, uint64_t waited_ns, uint64_t started_ns);

  Segment* segment_;
};

}  // namespace vmkv::coord
