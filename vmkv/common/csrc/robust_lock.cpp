#include "robust_lock.h"

#include <errno.h>
#include <string.h>
#include <time.h>

namespace vmkv::shm {

void init_robust_mutex(pthread_mutex_t* mutex) {
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(mutex, &attr);
  pthread_mutexattr_destroy(&attr);
}

RobustGuard::RobustGuard(pthread_mutex_t* mutex, int timeout_s, const std::string& what,
                         const std::function<void()>& repair)
    : mutex_(mutex) {
  timespec deadline{};
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_s;
  int rc = pthread_mutex_timedlock(mutex_, &deadline);
  if (rc == EOWNERDEAD) {
    try {
      repair();
    } catch (...) {
      pthread_mutex_consistent(mutex_);
      pthread_mutex_unlock(mutex_);
      throw;
    }
    pthread_mutex_consistent(mutex_);
  } else if (rc == ETIMEDOUT) {
    throw std::runtime_error(what + "'s lock was held for more than " + std::to_string(timeout_s) +
                             " s; if no vmkv process is stuck, run `vmkv reset`");
  } else if (rc != 0) {
    throw SegmentError(what + "'s lock is unusable (" + std::string(strerror(rc)) + "); run `vmkv reset`");
  }
}

RobustGuard::~RobustGuard() { pthread_mutex_unlock(mutex_); }

}  // namespace vmkv::shm
