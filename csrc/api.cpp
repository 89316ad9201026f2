// csrc/api.cpp: the C++ API of qlora/ops.h, calling each operator through the dispatcher.
#include "qlora/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace qlora {
namespace {

template <typename Sig> c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

} // namespace

int64_t Nf4Tensor::numel() const {
    int64_t n = 1;
    for (int64_t s : shape) {
        n *= s;
    }
    return n;
}

Nf4Tensor
nf4_quantize(const at::Tensor& weight, int64_t blocksize, bool double_quant, const std::optional<at::Tensor>& code) {
    using Sig = std::tuple<
        at::Tensor, at::Tensor, at::Tensor, at::Tensor,
        at::Tensor>(const at::Tensor&, int64_t, bool, const std::optional<at::Tensor>&);
    static const auto op = op_handle<Sig>("qlora::nf4_quantize");
    auto [packed, absmax, nested_absmax, nested_code, offset] = op.call(weight, blocksize, double_quant, code);
    Nf4Tensor q;
    q.packed = packed;
    q.absmax = absmax;
    if (double_quant) {
        q.nested_absmax = nested_absmax;
        q.nested_code = nested_code;
        q.offset = offset;
    }
    q.shape = weight.sizes().vec();
    q.dtype = weight.scalar_type();
    q.blocksize = blocksize;
    return q;
}

at::Tensor nf4_dequantize(const Nf4Tensor& q, std::optional<at::ScalarType> dtype) {
    using Sig = at::Tensor(
        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, c10::SymIntArrayRef, at::ScalarType, int64_t
    );
    static const auto op = op_handle<Sig>("qlora::nf4_dequantize");
    auto opt = [](const at::Tensor& t) {
        return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    return op.call(
        q.packed, q.absmax, opt(q.nested_absmax), opt(q.nested_code), opt(q.offset), c10::fromIntArrayRefSlow(q.shape),
        dtype.value_or(q.dtype), q.blocksize
    );
}

void nf4_dequantize_into(const Nf4Tensor& q, at::Tensor& out) {
    using Sig =
        void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::SymIntArrayRef, at::ScalarType, int64_t, at::Tensor&);
    static const auto op = op_handle<Sig>("qlora::nf4_dequantize_into");
    auto opt = [](const at::Tensor& t) {
        return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    op.call(
        q.packed, q.absmax, opt(q.nested_absmax), opt(q.nested_code), opt(q.offset), c10::fromIntArrayRefSlow(q.shape),
        out.scalar_type(), q.blocksize, out
    );
}

at::Tensor linear(
    const at::Tensor& x, const Nf4Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b, double lora_scale,
    const std::optional<at::Tensor>& lora_input
) {
    using Opt = std::optional<at::Tensor>;
    using Sig = at::
        Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&, int64_t, int64_t, const Opt&, const Opt&, const Opt&, double, const Opt&);
    static const auto op = op_handle<Sig>("qlora::linear");
    TORCH_CHECK(weight.shape.size() == 2, "qlora::linear: the NF4 weight must be 2-D [out, in]");
    auto opt = [](const at::Tensor& t) {
        return t.defined() ? Opt(t) : std::nullopt;
    };
    return op.call(
        x, weight.packed, weight.absmax, opt(weight.nested_absmax), opt(weight.nested_code), opt(weight.offset),
        weight.shape[0], weight.blocksize, bias, lora_a, lora_b, lora_scale, lora_input
    );
}

std::tuple<at::Tensor, at::Tensor> causal_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& segment_ids,
    std::optional<double> scale
) {
    using Opt = std::optional<at::Tensor>;
    using Sig = std::tuple<
        at::Tensor,
        at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, std::optional<double>);
    static const auto op = op_handle<Sig>("qlora::causal_attention");
    return op.call(q, k, v, segment_ids, scale);
}

void adamw8bit_step(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, double lr, double beta1,
    double beta2, double eps, double weight_decay
) {
    using Sig = void(
        at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
        const at::Tensor&, int64_t, double, double, double, double, double
    );
    static const auto op = op_handle<Sig>("qlora::adamw8bit_step");
    op.call(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay);
}

void adamw32bit_step(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step, double lr,
    double beta1, double beta2, double eps, double weight_decay
) {
    using Sig =
        void(at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, double, double, double, double, double);
    static const auto op = op_handle<Sig>("qlora::adamw32bit_step");
    op.call(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay);
}

at::Tensor paged_zeros(const at::Tensor& like, at::ScalarType dtype) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, at::ScalarType)>("qlora::paged_zeros");
    return op.call(like, dtype);
}

void paged_prefetch(const at::Tensor& state) {
    static const auto op = op_handle<void(const at::Tensor&)>("qlora::paged_prefetch");
    op.call(state);
}

at::Tensor nf4_code() {
    static const auto op = op_handle<at::Tensor()>("qlora::nf4_code");
    return op.call();
}

at::Tensor dynamic8_code(bool is_signed) {
    static const auto op = op_handle<at::Tensor(bool)>("qlora::dynamic8_code");
    return op.call(is_signed);
}

std::string cpu_isa() {
    static const auto op = op_handle<std::string()>("qlora::cpu_isa");
    return op.call();
}

void set_cpu_isa(const std::string& isa) {
    static const auto op = op_handle<void(const std::string&)>("qlora::_set_cpu_isa");
    op.call(isa);
}

} // namespace qlora
