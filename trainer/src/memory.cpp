// trainer/src/memory.cpp: see qlora/trainer/memory.h.
#include "qlora/trainer/memory.h"

#include <fstream>
#include <string>

namespace qlora::trainer {
namespace {

int64_t status_field_bytes(const std::string& field) { // "VmRSS:", "VmHWM:" (values in kB)
    std::ifstream f("/proc/self/status");
    for (std::string line; std::getline(f, line);) {
        if (line.rfind(field, 0) == 0) {
            return std::stoll(line.substr(field.size())) * 1024;
        }
    }
    return -1;
}

} // namespace

int64_t resident_bytes() {
    return status_field_bytes("VmRSS:");
}

int64_t peak_resident_bytes() {
    return status_field_bytes("VmHWM:");
}

} // namespace qlora::trainer
