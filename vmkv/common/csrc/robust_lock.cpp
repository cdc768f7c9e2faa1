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

namespace {

#ifdef __GLIBC__
// The type word glibc keeps in a mutex made by init_robust_mutex. Other values (a
// priority-protected or priority-inheriting type written into the shared segment) make
// glibc's lock assert and abort the process, so they are refused before locking.
int robust_kind() {
  static const int kind = [] {
    pthread_mutex_t probe;
    init_robust_mutex(&probe);
    const int value = probe.__data.__kind;
    pthread_mutex_destroy(&probe);
    return value;
  }();
  return kind;
}
#endif

}  // namespace

RobustGuard::RobustGuard(pthread_mutex_t* mutex, int timeout_s, const std::string& what,
                         const std::function<void()>& repair)
    : mutex_(mutex) {
  timespec deadline{};
#ifdef __GLIBC__
  if (__atomic_load_n(&mutex_->__data.__kind, __ATOMIC_RELAXED) != robust_kind()) {
    throw SegmentError(what + "'s lock has been overwritten (not a robust shared mutex); run `vmkv reset`");
  }
#endif
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
    throw SegmentError(what + "'s lock was held for more than " + std::to_string(timeout_s) +
                             " s; if no vmkv process is stuck, run `vmkv reset`");
  } else if (rc != 0) {
    throw SegmentError(what + "'s lock is unusable (" + std::string(strerror(rc)) + "); run `vmkv reset`");
  }
}

RobustGuard::~RobustGuard() { pthread_mutex_unlock(mutex_); }

}  // namespace vmkv::shm
