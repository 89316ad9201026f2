// csrc/cpu/cpu_isa.cpp: run-time SIMD selection for the CPU kernels (see cpu_isa.h).
#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace qlora::cpu {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl")) {
        return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return CpuIsa::kAvx2;
    }
#endif
    return CpuIsa::kScalar;
}

std::atomic<int>& active() {
    static std::atomic<int> isa{[] {
        const CpuIsa supported = cpu_isa_supported();
        const char* env = std::getenv("QLORA_CPU_ISA");
        if (env == nullptr || *env == '\0') {
            return static_cast<int>(supported);
        }
        const CpuIsa wanted = cpu_isa_from_name(env, "environment variable QLORA_CPU_ISA");
        TORCH_CHECK(
            static_cast<int>(wanted) <= static_cast<int>(supported), "QLORA_CPU_ISA=", env,
            " asks for an instruction set this CPU lacks (it supports up to ", cpu_isa_name(supported), ")"
        );
        return static_cast<int>(wanted);
    }()};
    return isa;
}

} // namespace

CpuIsa cpu_isa_supported() {
    static const CpuIsa supported = detect();
    return supported;
}

CpuIsa cpu_isa() {
    return static_cast<CpuIsa>(active().load(std::memory_order_relaxed));
}

void set_cpu_isa(CpuIsa isa) {
    const CpuIsa supported = cpu_isa_supported();
    TORCH_CHECK(
        static_cast<int>(isa) <= static_cast<int>(supported), "qlora: cannot select CPU ISA ", cpu_isa_name(isa),
        "; this CPU supports up to ", cpu_isa_name(supported)
    );
    active().store(static_cast<int>(isa), std::memory_order_relaxed);
}

bool cpu_has_avx512_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
    static const bool has = [] {
        __builtin_cpu_init();
        return cpu_isa_supported() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512vbmi");
    }();
    return has;
#else
    return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
    static const bool has = [] {
        __builtin_cpu_init();
        return cpu_isa_supported() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
    }();
    return has;
#else
    return false;
#endif
}

const char* cpu_isa_name(CpuIsa isa) {
    switch (isa) {
    case CpuIsa::kAvx512:
        return "avx512";
    case CpuIsa::kAvx2:
        return "avx2";
    case CpuIsa::kScalar:
        break;
    }
    return "scalar";
}

CpuIsa cpu_isa_from_name(const std::string& name, const char* what) {
    if (name == "avx512") {
        return CpuIsa::kAvx512;
    }
    if (name == "avx2") {
        return CpuIsa::kAvx2;
    }
    if (name == "scalar") {
        return CpuIsa::kScalar;
    }
    TORCH_CHECK(false, what, ": expected one of scalar, avx2, avx512, got '", name, "'");
}

} // namespace qlora::cpu
