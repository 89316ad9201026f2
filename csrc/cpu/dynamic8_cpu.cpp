// csrc/cpu/dynamic8_cpu.cpp: see dynamic8_cpu.h.
#include "dynamic8_cpu.h"

#include <algorithm>
#include <array>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "../core/blockwise.h"
#include "../core/dynamic8.h"
#include "dynamic8_simd.h"

namespace qlora::cpu {

at::Tensor dynamic8_code_tensor(bool is_signed) {
    at::Tensor code = at::empty({core::kDynamic8Codes}, at::TensorOptions().dtype(at::kFloat));
    float* p = code.data_ptr<float>();
    for (int i = 0; i < core::kDynamic8Codes; ++i) {
        p[i] = is_signed ? core::dynamic8_signed_value(i) : core::dynamic8_unsigned_value(i);
    }
    return code;
}

void dynamic8_check_code_sorted(const at::Tensor& code, const char* op) {
    const at::Tensor c = code.to(at::kCPU).contiguous();
    const float* p = c.const_data_ptr<float>();
    for (int64_t i = 1; i < c.numel(); ++i) {
        TORCH_CHECK(
            p[i - 1] < p[i], op, ": nested_code must be strictly ascending, but entry ", i, " (", p[i],
            ") is not above entry ", i - 1, " (", p[i - 1], ")"
        );
    }
}

std::tuple<at::Tensor, at::Tensor>
dynamic8_quantize_blocks_cpu(const at::Tensor& x, int64_t blocksize, const at::Tensor& code) {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu());
    TORCH_INTERNAL_ASSERT(code.scalar_type() == at::kFloat && code.numel() == core::kDynamic8Codes);
    TORCH_INTERNAL_ASSERT(blocksize > 0);
    const int64_t n = x.numel();
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
    at::Tensor absmax = at::empty({nblocks}, x.options());
    std::array<float, core::kDynamic8Codes> map{};
    const at::Tensor code_c = code.contiguous();
    std::copy_n(code_c.const_data_ptr<float>(), core::kDynamic8Codes, map.begin());
    const float* src = x.const_data_ptr<float>();
    uint8_t* q = codes.data_ptr<uint8_t>();
    float* am = absmax.data_ptr<float>();
    const CpuIsa isa = cpu_isa();
    at::parallel_for(0, nblocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t s = b * blocksize;
            const int64_t e = std::min(s + blocksize, n);
            float m = 0.0f;
            for (int64_t i = s; i < e; ++i) {
                m = core::absmax_update(m, src[i]);
            }
            am[b] = m;
            dynamic8_encode_run(isa, map.data(), src + s, core::block_scale(m), e - s, q + s);
        }
    });
    return {codes, absmax};
}

} // namespace qlora::cpu
