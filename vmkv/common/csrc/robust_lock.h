// A process-shared robust mutex with a deadline, for tables that live in shared memory.
//
// When a holder dies at any instruction, the next locker gets EOWNERDEAD; the table's
// `repair` callback then rebuilds what the dead holder may have left half-updated before
// anyone reads it. A lock held past the deadline is reported, never waited on forever.
#pragma once

#include <pthread.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace vmkv::shm {

// The shared segment is unusable as it stands (bad magic, foreign layout, corruption).
class SegmentError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void init_robust_mutex(pthread_mutex_t* mutex);

// RAII: locks in the constructor (repairing after a dead owner), unlocks in the destructor.
class RobustGuard {
 public:
  // `what` names the table in errors ("the coordinator", "the spill tier").
  RobustGuard(pthread_mutex_t* mutex, int timeout_s, const std::string& what, const std::function<void()>& repair);
  ~RobustGuard();
  RobustGuard(const RobustGuard&) = delete;
  RobustGuard& operator=(const RobustGuard&) = delete;

 private:
  pthread_mutex_t* mutex_;
};

}  // namespace vmkv::shm
