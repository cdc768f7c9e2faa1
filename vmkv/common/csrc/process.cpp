#include "process.h"

#include <errno.h>
#include <signal.h>
#include <time.h>

#include <fstream>
#include <sstream>
#include <string>

namespace vmkv::shm {
namespace {

// Field 3 (state) and field 22 (start time) of /proc/<pid>/stat; false when unreadable.
bool read_stat(int32_t pid, char* state, uint64_t* start_time) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  // The command name may contain spaces and parentheses: fields resume after the last ')'.
  size_t close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  std::istringstream fields(line.substr(close + 2));
  std::string field;
  for (int index = 3; fields >> field; ++index) {
    if (index == 3) *state = field[0];
    if (index == 22) {
      *start_time = std::stoull(field);
      return true;
    }
  }
  return false;
}

}  // namespace

uint64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ULL + static_cast<uint64_t>(ts.tv_nsec);
}

uint64_t process_start_time(int32_t pid) {
  char state = 0;
  uint64_t start_time = 0;
  return read_stat(pid, &state, &start_time) ? start_time : 0;
}

bool process_alive(int32_t pid, uint64_t start_time) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  char state = 0;
  uint64_t started = 0;
  if (!read_stat(pid, &state, &started)) return false;
  return started == start_time && state != 'Z' && state != 'X';
}

}  // namespace vmkv::shm
