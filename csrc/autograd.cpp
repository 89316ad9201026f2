// csrc/autograd.cpp: qlora::linear, the differentiable QLoRA layer, with its autograd in C++ (so a pure LibTorch
// program gets gradients without Python).
//
//   y = x W^T + bias + s (xl A^T) B^T         x [*, K], W NF4 [N, K], A [r, K], B [N, r], xl = lora_input or x
//
// Forward saves the packed weight (never a dequantized copy), A, B, xl and t = xl A^T [*, r] (the forward already has
// t; backward reuses it for grad B). Backward, with g = dL/dy:
//   grad_x  = g W (qlora::nf4_linear_grad_input)  [+ s (g B) A when xl is x]
//   grad_A  = s (g B)^T xl        grad_B = s g^T t        grad_bias = sum of g over the leading dims
//   grad_xl = s (g B) A           (when lora_input is given)
// No gradient ever flows to the NF4 weight (frozen; torchao LinearNF4 semantics).
//
// Kernels: Autograd (the Function below) and CompositeExplicitAutograd (the same forward with nothing saved; also
// what Meta tensors and torch.compile/export see, since it is built from ops that have Meta kernels).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "nf4_checks.h"

namespace qlora {
namespace {

using OptTensor = std::optional<at::Tensor>;

OptTensor opt(const at::Tensor& t) {
    return t.defined() ? OptTensor(t) : std::nullopt;
}
at::Tensor val(const OptTensor& t) {
    return t.has_value() ? *t : at::Tensor();
}

at::Tensor call_nf4_linear(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t out_features, int64_t blocksize,
    const OptTensor& bias
) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("qlora::nf4_linear", "")
            .typed<
                at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, const OptTensor&)>(
            );
    return op.call(x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias);
}

at::Tensor call_nf4_linear_grad_input(
    const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t in_features, int64_t blocksize
) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qlora::nf4_linear_grad_input", "")
                               .typed<at::Tensor(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, int64_t, int64_t
                               )>();
    return op.call(g, packed, absmax, nested_absmax, nested_code, offset, in_features, blocksize);
}

void check_lora_args(
    const at::Tensor& x, int64_t out_features, const OptTensor& lora_a, const OptTensor& lora_b,
    const OptTensor& lora_input
) {
    const char* op = "qlora::linear";
    TORCH_CHECK(
        lora_a.has_value() == lora_b.has_value(), op, ": lora_a and lora_b must be given together (got ",
        lora_a.has_value() ? "lora_a only" : "lora_b only", ")"
    );
    if (!lora_a.has_value()) {
        TORCH_CHECK(!lora_input.has_value(), op, ": lora_input given without lora_a/lora_b");
        return;
    }
    const c10::SymInt K = x.sym_size(-1);
    TORCH_CHECK(
        lora_a->dim() == 2 && lora_a->sym_size(1) == K, op, ": lora_a must be [r, in_features=", K, "], got ",
        lora_a->sym_sizes()
    );
    TORCH_CHECK(
        lora_b->dim() == 2 && lora_b->sym_size(0) == out_features && lora_b->sym_size(1) == lora_a->sym_size(0), op,
        ": lora_b must be [out_features=", out_features, ", r=", lora_a->sym_size(0), "], got ", lora_b->sym_sizes()
    );
    if (lora_input.has_value()) {
        TORCH_CHECK(
            lora_input->sym_sizes() == x.sym_sizes(), op, ": lora_input must have the shape of x ", x.sym_sizes(),
            ", got ", lora_input->sym_sizes()
        );
    }
}

// The forward shared by both kernels; returns y and, through t_out, t = xl A^T (undefined without LoRA).
at::Tensor linear_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t out_features, int64_t blocksize,
    const OptTensor& bias, const OptTensor& lora_a, const OptTensor& lora_b, double lora_scale,
    const OptTensor& lora_input, at::Tensor* t_out
) {
    check_lora_args(x, out_features, lora_a, lora_b, lora_input);
    at::Tensor y =
        call_nf4_linear(x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias);
    if (lora_a.has_value()) {
        const at::Tensor& xl = lora_input.has_value() ? *lora_input : x;
        at::Tensor t = at::matmul(xl, lora_a->t());
        y = y.add(at::matmul(t, lora_b->t()), lora_scale);
        if (t_out != nullptr) {
            *t_out = t;
        }
    }
    return y;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
  public:
    // Optional tensors stay std::optional here: Function::apply treats them as non-variables when absent. Which inputs
    // need a gradient is recorded by name in saved_data (needs_input_grad counts only the tensors present).
    static at::Tensor forward(
        torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
        const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset, int64_t out_features,
        int64_t blocksize, const OptTensor& bias, const OptTensor& lora_a, const OptTensor& lora_b, double lora_scale,
        const OptTensor& lora_input
    ) {
        auto requires_grad = [](const OptTensor& t) {
            return t.has_value() && t->requires_grad();
        };
        ctx->saved_data["x_requires_grad"] = x.requires_grad();
        ctx->saved_data["bias_requires_grad"] = requires_grad(bias);
        ctx->saved_data["lora_a_requires_grad"] = requires_grad(lora_a);
        ctx->saved_data["lora_b_requires_grad"] = requires_grad(lora_b);
        ctx->saved_data["lora_input_requires_grad"] = requires_grad(lora_input);
        at::AutoDispatchBelowADInplaceOrView guard;
        at::Tensor t;
        at::Tensor y = linear_forward(
            x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias, lora_a, lora_b,
            lora_scale, lora_input, &t
        );
        const at::Tensor xl = lora_a.has_value() ? (lora_input.has_value() ? *lora_input : x) : at::Tensor();
        ctx->save_for_backward(
            {packed, absmax, val(nested_absmax), val(nested_code), val(offset), val(lora_a), val(lora_b), xl, t}
        );
        ctx->saved_data["in_features"] = x.size(-1);
        ctx->saved_data["out_features"] = out_features;
        ctx->saved_data["blocksize"] = blocksize;
        ctx->saved_data["lora_scale"] = lora_scale;
        ctx->saved_data["has_lora_input"] = lora_input.has_value();
        return y;
    }

    static torch::autograd::variable_list
    backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grad_outputs) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &packed = saved[0], &absmax = saved[1], &lora_a = saved[5], &lora_b = saved[6], &xl = saved[7],
                         &t = saved[8];
        const int64_t K = ctx->saved_data["in_features"].toInt();
        const int64_t N = ctx->saved_data["out_features"].toInt();
        const int64_t blocksize = ctx->saved_data["blocksize"].toInt();
        const double s = ctx->saved_data["lora_scale"].toDouble();
        const bool has_lora_input = ctx->saved_data["has_lora_input"].toBool();
        const at::Tensor g = grad_outputs[0].contiguous();

        at::Tensor grad_x, grad_bias, grad_a, grad_b, grad_xl;
        const bool x_rg = ctx->saved_data["x_requires_grad"].toBool();
        if (x_rg) {
            grad_x = call_nf4_linear_grad_input(
                g, packed, absmax, opt(saved[2]), opt(saved[3]), opt(saved[4]), K, blocksize
            );
        }
        if (ctx->saved_data["bias_requires_grad"].toBool()) {
            grad_bias = g.reshape({-1, N}).sum(0);
        }
        if (lora_a.defined()) {
            const int64_t r = lora_a.size(0);
            const at::Tensor u = at::matmul(g, lora_b); // [*, r]
            const at::Tensor u2 = u.reshape({-1, r});
            if (ctx->saved_data["lora_a_requires_grad"].toBool()) {
                grad_a = at::mm(u2.t(), xl.reshape({-1, K})).mul(s);
            }
            if (ctx->saved_data["lora_b_requires_grad"].toBool()) {
                grad_b = at::mm(g.reshape({-1, N}).t(), t.reshape({-1, r})).mul(s);
            }
            const bool want_xl = has_lora_input ? ctx->saved_data["lora_input_requires_grad"].toBool() : x_rg;
            if (want_xl) {
                at::Tensor gxl = at::matmul(u, lora_a).mul(s);
                if (has_lora_input) {
                    grad_xl = gxl;
                } else {
                    grad_x = grad_x.add(gxl);
                }
            }
        }
        return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                at::Tensor(), grad_bias,    grad_a,       grad_b,       at::Tensor(), grad_xl};
    }
};

at::Tensor linear_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t out_features, int64_t blocksize,
    const OptTensor& bias, const OptTensor& lora_a, const OptTensor& lora_b, double lora_scale,
    const OptTensor& lora_input
) {
    return LinearFunction::apply(
        x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias, lora_a, lora_b,
        lora_scale, lora_input
    );
}

at::Tensor linear_composite(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t out_features, int64_t blocksize,
    const OptTensor& bias, const OptTensor& lora_a, const OptTensor& lora_b, double lora_scale,
    const OptTensor& lora_input
) {
    return linear_forward(
        x, packed, absmax, nested_absmax, nested_code, offset, out_features, blocksize, bias, lora_a, lora_b,
        lora_scale, lora_input, nullptr
    );
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
    m.impl("linear", &linear_autograd);
}

TORCH_LIBRARY_IMPL(qlora, CompositeExplicitAutograd, m) {
    m.impl("linear", &linear_composite);
}

} // namespace qlora
