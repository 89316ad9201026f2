// csrc/attention.cpp: autograd of qlora::causal_attention (in C++, so a pure LibTorch program gets gradients).
//
// Forward saves q, k, v, out and lse (float32 [B, H, T], the only extra memory), never the attention matrix;
// backward calls qlora::causal_attention_backward, which recomputes the probabilities block by block. lse is not
// differentiable.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace qlora {
namespace {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& seg, std::optional<double> scale
) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qlora::causal_attention", "")
            .typed<std::tuple<
                at::Tensor,
                at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, std::optional<double>)>(
            );
    return op.call(q, k, v, seg, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& seg, std::optional<double> scale
) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qlora::causal_attention_backward", "")
            .typed<std::tuple<
                at::Tensor, at::Tensor,
                at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, std::optional<double>)>(
            );
    return op.call(g, q, k, v, out, lse, seg, scale);
}

class CausalAttentionFunction : public torch::autograd::Function<CausalAttentionFunction> {
  public:
    static torch::autograd::variable_list forward(
        torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
        const OptTensor& segment_ids, std::optional<double> scale
    ) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [out, lse] = call_forward(q, k, v, segment_ids, scale);
        ctx->save_for_backward({q, k, v, out, lse, segment_ids.has_value() ? *segment_ids : at::Tensor()});
        ctx->saved_data["scale"] = scale; // None when not given
        ctx->mark_non_differentiable({lse});
        return {out, lse};
    }

    static torch::autograd::variable_list
    backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
        const OptTensor seg = saved[5].defined() ? OptTensor(saved[5]) : std::nullopt;
        const std::optional<double> scale = ctx->saved_data["scale"].toOptional<double>();
        // out is the only differentiable output and autograd materializes an unused gradient as zeros, so
        // grad_outputs[0] is always defined here.
        const at::Tensor& g = grad_outputs[0];
        auto [dq, dk, dv] = call_backward(g, q, k, v, out, lse, seg, scale);
        return {dq, dk, dv, at::Tensor(), at::Tensor()};
    }
};

std::tuple<at::Tensor, at::Tensor> causal_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& segment_ids,
    std::optional<double> scale
) {
    auto outs = CausalAttentionFunction::apply(q, k, v, segment_ids, scale);
    return {outs[0], outs[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
    m.impl("causal_attention", &causal_attention_autograd);
}

} // namespace qlora
