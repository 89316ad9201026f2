// qlora/trainer/memory.h: this process's resident memory from /proc/self/status: VmRSS now and VmHWM, its peak.
// (getrusage's ru_maxrss is not used: Linux carries it across fork and exec, so a process spawned by a large one
// starts with its parent's peak.) Both return -1 where /proc is unavailable.
#pragma once

#include <cstdint>

namespace qlora::trainer {

int64_t resident_bytes();
int64_t peak_resident_bytes();

} // namespace qlora::trainer
