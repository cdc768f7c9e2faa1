// The spill tier's shared index: which host slot holds which KV block, for every process
// that serves the same model on this node.
//
// One segment per namespace (model, dtype, layout, block size, hash seed) holds this
// index followed by the slots' data. Each entry is the truth about one slot; the hash
// chains are derived from the entries and rebuilt whenever a process died holding the
// lock, so a crash at any instruction never leaves a key pointing at the wrong data.
//
// A slot's life: kFree -> reserve -> kWriting (owned by one process; its bytes are being
// copied in, invisible to lookups) -> commit -> kValid (found by lookup; evictable when no
// process pins it for a read) -> evicted -> kFree. A dead writer's slots and a dead
// reader's pins are dropped by the sweep.
#pragma once

#include <pthread.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "process.h"
#include "robust_lock.h"

namespace vmkv::spill {

using shm::SegmentError;

constexpr uint64_t kMagic = 0x4c4c495053564d56ULL;  // "VMVSPILL" little-endian
constexpr uint32_t kVersion = 2;
constexpr uint32_t kMaxProcs = 64;  // processes attached at once (readers are a 64-bit mask)
constexpr size_t kKeyBytes = 16;
constexpr size_t kNamespaceBytes = 32;

enum EntryState : uint32_t { kFree = 0, kWriting = 1, kValid = 2 };

// Which valid, unpinned slot goes first when room is needed. The policy only ranks
// entries; adding one means adding a case to rank() in index.cpp.
enum class Policy : uint32_t { kLru = 0, kFifo = 1, kLfu = 2 };

struct Proc {
  int32_t pid;  // 0: unused
  uint32_t reserved0;
  uint64_t start_time;
};

struct Entry {
  uint8_t key[kKeyBytes];
  uint32_t state;
  int32_t writer;      // process index while kWriting
  uint64_t readers;    // bit i: process i pins the slot for a read in flight
  int64_t hash_next;   // next entry in the same bucket, -1 ends the chain
  uint64_t inserted;   // tick of commit
  uint64_t last_use;   // tick of the last hit
  uint64_t uses;       // hits since commit
};

// Layout of a segment with room for `slot_count` slots of `slot_bytes`.
struct Geometry {
  uint64_t slot_count;
  uint64_t slot_bytes;   // data bytes of one slot (one block, every layer)
  uint64_t slot_stride;  // distance between slots in the data area
  uint64_t bucket_count;
  uint64_t data_offset;  // from the start of the segment
  uint64_t total_bytes;
};

struct Counters {
  uint64_t stored;           // slots committed
  uint64_t hits;             // keys found by lookup
  uint64_t misses;           // lookups that stopped at an absent key
  uint64_t evictions;        // valid slots dropped to make room
  uint64_t retrieves;        // slots pinned for a read
  uint64_t aborted;          // reservations dropped (failed copy, dead writer)
  uint64_t lock_recoveries;  // times a lock holder died and the index was rebuilt
};

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t header_bytes;
  uint32_t entry_bytes;
  uint32_t policy;
  Geometry geometry;
  uint8_t namespace_digest[kNamespaceBytes];
  uint64_t tick;
  Counters counters;
  uint32_t initialized;
  uint32_t reserved0;
  pthread_mutex_t lock;
  Proc procs[kMaxProcs];
};

// What the slots hold now (counted under the lock), next to the lifetime counters.
struct Stats {
  uint64_t valid, writing, pinned, free, attached;
  Geometry geometry;
  Counters counters;
};

Geometry geometry_for(uint64_t slot_count, uint64_t slot_bytes);

class Index {
 public:
  Index(uintptr_t address, size_t size);

  bool initialized() const;
  void initialize(const Geometry& g, Policy policy, const std::string& namespace_digest);
  Header header_copy();

  // Takes a process entry for `pid`; every later call names it.
  uint32_t attach(int32_t pid);
  // Drops the process's reservations and pins; returns the processes still attached.
  uint32_t detach(uint32_t proc);

  // Slots for `keys` that are not present yet, evicting by policy to make room. Result i
  // is the slot reserved for key i, or -1 when that key is present or listed earlier. All
  // or nothing: nullopt (nothing changed) when the tier cannot make room.
  std::optional<std::vector<int64_t>> reserve(uint32_t proc, const std::vector<std::string>& keys);
  void commit(uint32_t proc, const std::vector<int64_t>& slots);
  void abort(uint32_t proc, const std::vector<int64_t>& slots);

  // How many leading keys are valid in the tier (a hit refreshes them under LRU/LFU).
  uint64_t lookup(const std::vector<std::string>& keys);
  // Pins the slots of `keys` for a read. Every key must be valid: otherwise the index of
  // the first missing key is returned in `missing` and nothing is pinned.
  std::vector<int64_t> pin(uint32_t proc, const std::vector<std::string>& keys, int64_t* missing);
  void unpin(uint32_t proc, const std::vector<int64_t>& slots);
  // kValid / kWriting of the key's slot, or -1 when absent.
  int state(const std::string& key);

  uint64_t sweep();  // drops dead processes; returns how many
  Stats stats();

 private:
  class Guard;
  void validate_header() const;
  void repair_after_owner_death();
  void rebuild_chains();
  uint64_t sweep_locked();
  void release_proc(uint32_t proc);
  Proc& attached(uint32_t proc);
  // Every slot is being written by `proc` (commit and abort apply to nothing else).
  void check_writing(uint32_t proc, const std::vector<int64_t>& slots);
  Entry& entry(int64_t slot);
  int64_t* buckets();
  int64_t find(const uint8_t* key);
  void link(int64_t slot);
  void unlink(int64_t slot);
  void touch(Entry& e);
  uint64_t rank(const Entry& e) const;

  Header* header_;
  size_t size_;
  // The geometry as first validated. It never changes after initialization, so every
  // loop bound and offset comes from this private copy: a process that rewrites the shared
  // one mid-call cannot move them past the mapping (a change is caught as corruption).
  mutable Geometry geometry_{};
  mutable bool geometry_known_ = false;
};

}  // namespace vmkv::spill
