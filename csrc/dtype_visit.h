// csrc/dtype_visit.h: dispatch on the floating-point dtypes the operators take, for the CPU and CUDA ATen layers.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace qlora {

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half for an already checked dtype (anything else is Half).
template <typename F> void visit_float_dtype(at::ScalarType t, F&& f) {
    switch (t) {
    case at::kFloat:
        f(float{});
        break;
    case at::kBFloat16:
        f(c10::BFloat16{});
        break;
    default:
        f(c10::Half{});
        break;
    }
}

} // namespace qlora
