// Process identity and clocks for the shared-memory tables (coordinator, spill index).
//
// A pid alone does not identify a process: pids are reused. Tables record the pid together
// with its start time (field 22 of /proc/<pid>/stat) and treat a mismatch as death.
#pragma once

#include <cstdint>

namespace vmkv::shm {

uint64_t monotonic_ns();
uint64_t process_start_time(int32_t pid);  // 0 when the process does not exist
// The same process (pid and start time) and not a zombie: a zombie's parent may never
// reap it, and it will never give back what it holds.
bool process_alive(int32_t pid, uint64_t start_time);

}  // namespace vmkv::shm
