// csrc/optim.cpp: qlora::optim::AdamW8bit (qlora/optim.h), the C++ twin of python/qlora/optim.py. The optimizer ops
// are called through the C++ API (qlora/ops.h, the dispatcher), so CPU and CUDA kernels are chosen as for
// torch.ops.qlora.*.
#include "qlora/optim.h"

#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <set>

#include <ATen/core/grad_mode.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include "adamw_checks.h"
#include "qlora/ops.h"

namespace qlora::optim {
namespace {

double beta1_of(const AdamW8bitOptions& o) {
    return std::get<0>(o.betas());
}
double beta2_of(const AdamW8bitOptions& o) {
    return std::get<1>(o.betas());
}

std::string dtype_name(at::ScalarType t) {
    switch (t) {
    case at::kFloat:
        return "float32";
    case at::kBFloat16:
        return "bfloat16";
    case at::kHalf:
        return "float16";
    case at::kDouble:
        return "float64";
    case at::kByte:
        return "uint8";
    case at::kLong:
        return "int64";
    default:
        return c10::toString(t);
    }
}

// One group's hyperparameters, checked with the rules of the ops (csrc/adamw_checks.h) but named as the caller
// knows them: `fields` names lr, beta1, beta2, eps and weight_decay; `where` (may be empty) says whose they are.
struct Hyper {
    double lr, beta1, beta2, eps, weight_decay;
};

const std::array<std::string, 5> kOptionFields = {"lr", "betas[0]", "betas[1]", "eps", "weight_decay"};

Hyper hyper_of(const AdamW8bitOptions& o) {
    return {o.lr(), beta1_of(o), beta2_of(o), o.eps(), o.weight_decay()};
}

void check_hyper(
    const std::string& who, const std::string& where, const Hyper& h, const std::array<std::string, 5>& fields
) {
    const std::string of = where.empty() ? "" : " of " + where;
    TORCH_CHECK_VALUE(
        std::isfinite(h.lr) && h.lr >= 0.0, who, ": ", fields[0], of, " must be finite and >= 0, got ", h.lr
    );
    TORCH_CHECK_VALUE(h.beta1 >= 0.0 && h.beta1 < 1.0, who, ": ", fields[1], of, " must be in [0, 1), got ", h.beta1);
    TORCH_CHECK_VALUE(h.beta2 >= 0.0 && h.beta2 < 1.0, who, ": ", fields[2], of, " must be in [0, 1), got ", h.beta2);
    TORCH_CHECK_VALUE(
        std::isfinite(h.eps) && h.eps >= 0.0, who, ": ", fields[3], of, " must be finite and >= 0, got ", h.eps
    );
    TORCH_CHECK_VALUE(
        std::isfinite(h.weight_decay) && h.weight_decay >= 0.0, who, ": ", fields[4], of,
        " must be finite and >= 0, got ", h.weight_decay
    );
}

// What the ops need of a parameter, named by its place in the optimizer.
void check_param(const std::string& who, const at::Tensor& param, size_t gi, size_t pi) {
    const at::ScalarType t = param.scalar_type();
    TORCH_CHECK_TYPE(
        t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, who, ": parameter ", pi, " of param group ", gi,
        " is ", dtype_name(t), "; float32, bfloat16 or float16 expected"
    );
    TORCH_CHECK_VALUE(
        param.is_contiguous(), who, ": parameter ", pi, " of param group ", gi, " (shape ", param.sizes(),
        ") must be contiguous"
    );
}

void check_grad(const std::string& who, const at::Tensor& param, const at::Tensor& grad, size_t gi, size_t pi) {
    TORCH_CHECK_VALUE(!grad.is_sparse(), who, ": parameter ", pi, " of param group ", gi, " has a sparse gradient");
    TORCH_CHECK_TYPE(
        grad.scalar_type() == param.scalar_type(), who, ": parameter ", pi, " of param group ", gi, " is ",
        dtype_name(param.scalar_type()), " but its gradient is ", dtype_name(grad.scalar_type())
    );
    TORCH_CHECK_VALUE(
        grad.sizes() == param.sizes(), who, ": parameter ", pi, " of param group ", gi, " has shape ", param.sizes(),
        " but its gradient has shape ", grad.sizes()
    );
}

void refuse_archive(const std::string& who) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, who,
        ": torch::serialize archives (pickle) are not supported; save qlora::optim::AdamW8bit::state_tensors() "
        "(e.g. to safetensors) and restore it with load_state_tensors()"
    );
}

bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
    if (!a.defined() || !b.defined()) {
        return a.defined() == b.defined();
    }
    return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && a.device() == b.device() && at::equal(a, b);
}

} // namespace

// --------------------------------------------------------------------------------------------------------------
// Options and state

void AdamW8bitOptions::serialize(torch::serialize::InputArchive& /*archive*/) {
    refuse_archive("qlora::optim::AdamW8bitOptions::serialize");
}
void AdamW8bitOptions::serialize(torch::serialize::OutputArchive& /*archive*/) const {
    refuse_archive("qlora::optim::AdamW8bitOptions::serialize");
}

bool operator==(const AdamW8bitOptions& lhs, const AdamW8bitOptions& rhs) {
    return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
           lhs.weight_decay() == rhs.weight_decay();
}

double AdamW8bitOptions::get_lr() const {
    return lr();
}
void AdamW8bitOptions::set_lr(const double lr) {
    this->lr(lr);
}

void AdamW8bitParamState::serialize(torch::serialize::InputArchive& /*archive*/) {
    refuse_archive("qlora::optim::AdamW8bitParamState::serialize");
}
void AdamW8bitParamState::serialize(torch::serialize::OutputArchive& /*archive*/) const {
    refuse_archive("qlora::optim::AdamW8bitParamState::serialize");
}

bool operator==(const AdamW8bitParamState& lhs, const AdamW8bitParamState& rhs) {
    return lhs.step() == rhs.step() && same_tensor(lhs.state1(), rhs.state1()) &&
           same_tensor(lhs.state2(), rhs.state2()) && same_tensor(lhs.absmax1(), rhs.absmax1()) &&
           same_tensor(lhs.absmax2(), rhs.absmax2()) && same_tensor(lhs.qmap1(), rhs.qmap1()) &&
           same_tensor(lhs.qmap2(), rhs.qmap2());
}

// --------------------------------------------------------------------------------------------------------------
// Construction

AdamW8bit::AdamW8bit(
    const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamW8bitOptions defaults,
    AdamW8bitConfig config
)
    : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{}, std::make_unique<AdamW8bitOptions>(defaults)),
      config_(config) {
    const std::string who = name();
    TORCH_CHECK_VALUE(
        config_.optim_bits() == 8 || config_.optim_bits() == 32, who, ": optim_bits must be 8 or 32, got ",
        config_.optim_bits()
    );
    TORCH_CHECK_VALUE(config_.min_8bit_size() >= 0, who, ": min_8bit_size must be >= 0, got ", config_.min_8bit_size());
    TORCH_CHECK_VALUE(config_.page_min_size() >= 0, who, ": page_min_size must be >= 0, got ", config_.page_min_size());
    check_hyper(who, "the defaults", hyper_of(defaults), kOptionFields);
    for (const auto& group : param_groups) {
        add_param_group(group);
    }
}

AdamW8bit::AdamW8bit(std::vector<torch::Tensor> params, AdamW8bitOptions defaults, AdamW8bitConfig config)
    : AdamW8bit(
          std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
          std::move(defaults), config
      ) {}

void AdamW8bit::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
    const std::string where = "param group " + std::to_string(param_groups_.size());
    if (param_group.has_options()) {
        const auto* options = dynamic_cast<const AdamW8bitOptions*>(&param_group.options());
        TORCH_CHECK_TYPE(
            options != nullptr, name(), ": ", where, " has the options of another optimizer; AdamW8bitOptions expected"
        );
        check_hyper(name(), where, hyper_of(*options), kOptionFields);
    }
    // Every parameter in one place only. (torch's own check of this looks at the states, so it misses parameters
    // that have not been stepped yet.)
    std::map<const void*, size_t> group_of;
    for (size_t gi = 0; gi <= param_groups_.size(); ++gi) {
        const auto& params = gi < param_groups_.size() ? param_groups_[gi].params() : param_group.params();
        for (size_t pi = 0; pi < params.size(); ++pi) {
            const auto [it, inserted] = group_of.emplace(params[pi].unsafeGetTensorImpl(), gi);
            TORCH_CHECK_VALUE(
                inserted, name(), ": parameter ", pi, " of param group ", gi, " is already in param group ", it->second
            );
        }
    }
    Optimizer::add_param_group(param_group);
    // torch merges a group's options with the defaults only for its own optimizers and otherwise keeps the defaults.
    if (param_group.has_options()) {
        param_groups_.back().set_options(param_group.options().clone());
    }
}

std::string AdamW8bit::name() const {
    return std::string("qlora::optim::") + (config_.paged() ? "Paged" : "") +
           (config_.optim_bits() == 32 ? "AdamW32bit" : "AdamW8bit");
}

bool AdamW8bit::uses_8bit(const at::Tensor& param) const {
    return config_.optim_bits() == 8 && param.numel() >= config_.min_8bit_size();
}

bool AdamW8bit::is_paged(const at::Tensor& param) const {
    return config_.paged() && param.numel() >= config_.page_min_size();
}

AdamW8bitParamState AdamW8bit::fresh_state(const at::Tensor& param) const {
    const bool paged = is_paged(param);
    const auto on_device = at::TensorOptions().device(param.device());
    const auto moments = [&](at::ScalarType dtype) {
        return paged ? qlora::paged_zeros(param, dtype) : at::zeros(param.sizes(), on_device.dtype(dtype));
    };
    AdamW8bitParamState s;
    if (!uses_8bit(param)) {
        s.state1(moments(at::kFloat)).state2(moments(at::kFloat));
        return s;
    }
    const int64_t nblocks = adamw8_num_blocks(param.numel());
    s.state1(moments(at::kByte)).state2(moments(at::kByte));
    s.absmax1(at::zeros({nblocks}, on_device.dtype(at::kFloat)))
        .absmax2(at::zeros({nblocks}, on_device.dtype(at::kFloat)));
    s.qmap1(qlora::dynamic8_code(true).to(param.device())).qmap2(qlora::dynamic8_code(false).to(param.device()));
    return s;
}

// --------------------------------------------------------------------------------------------------------------
// Step

torch::Tensor AdamW8bit::step(LossClosure closure) {
    at::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure != nullptr) {
        at::AutoGradMode enable_grad(true);
        loss = closure();
    }
    const std::string who = name();
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        auto& group = param_groups_[gi];
        const auto& options = static_cast<const AdamW8bitOptions&>(group.options());
        // Schedulers and set_lr can change the hyperparameters between steps.
        check_hyper(who, "param group " + std::to_string(gi), hyper_of(options), kOptionFields);
        for (size_t pi = 0; pi < group.params().size(); ++pi) {
            at::Tensor& param = group.params()[pi];
            const at::Tensor& grad = param.grad();
            if (!grad.defined()) {
                continue;
            }
            check_param(who, param, gi, pi);
            check_grad(who, param, grad, gi, pi);
            auto it = state_.find(param.unsafeGetTensorImpl());
            if (it == state_.end()) {
                auto fresh = std::make_unique<AdamW8bitParamState>(fresh_state(param));
                it = state_.emplace(param.unsafeGetTensorImpl(), std::move(fresh)).first;
            }
            auto& state = static_cast<AdamW8bitParamState&>(*it->second);
            const int64_t step = state.step() + 1; // bitsandbytes counts this update (t >= 1)
            if (is_paged(param)) {
                qlora::paged_prefetch(state.state1());
                qlora::paged_prefetch(state.state2());
            }
            const at::Tensor g = grad.contiguous();
            if (state.state1().scalar_type() == at::kByte) {
                qlora::adamw8bit_step(
                    param, g, state.state1(), state.state2(), state.absmax1(), state.absmax2(), state.qmap1(),
                    state.qmap2(), step, options.lr(), beta1_of(options), beta2_of(options), options.eps(),
                    options.weight_decay()
                );
            } else {
                qlora::adamw32bit_step(
                    param, g, state.state1(), state.state2(), step, options.lr(), beta1_of(options), beta2_of(options),
                    options.eps(), options.weight_decay()
                );
            }
            state.step(step); // only once the op succeeded
        }
    }
    return loss;
}

// --------------------------------------------------------------------------------------------------------------
// Checkpoints

void AdamW8bit::save(torch::serialize::OutputArchive& /*archive*/) const {
    refuse_archive(name() + "::save");
}
void AdamW8bit::load(torch::serialize::InputArchive& /*archive*/) {
    refuse_archive(name() + "::load");
}

std::map<std::string, torch::Tensor> AdamW8bit::state_tensors() const {
    const auto snapshot = [](const at::Tensor& t) {
        return t.to(
            at::TensorOptions().device(at::kCPU), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous
        );
    };
    const auto scalar = [](double v) {
        return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
    };
    std::map<std::string, torch::Tensor> out;
    int64_t index = 0;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        const auto& group = param_groups_[gi];
        const auto& o = static_cast<const AdamW8bitOptions&>(group.options());
        const std::string g = "param_groups." + std::to_string(gi) + ".";
        out[g + "lr"] = scalar(o.lr());
        out[g + "beta1"] = scalar(beta1_of(o));
        out[g + "beta2"] = scalar(beta2_of(o));
        out[g + "eps"] = scalar(o.eps());
        out[g + "weight_decay"] = scalar(o.weight_decay());
        for (const at::Tensor& param : group.params()) {
            const std::string prefix = "state." + std::to_string(index++) + ".";
            const auto it = state_.find(param.unsafeGetTensorImpl());
            if (it == state_.end()) {
                continue;
            }
            const auto& s = static_cast<const AdamW8bitParamState&>(*it->second);
            out[prefix + "step"] = at::scalar_tensor(s.step(), at::TensorOptions().dtype(at::kLong));
            const std::pair<const char*, const at::Tensor*> buffers[] = {
                {"state1", &s.state1()},   {"state2", &s.state2()}, {"absmax1", &s.absmax1()},
                {"absmax2", &s.absmax2()}, {"qmap1", &s.qmap1()},   {"qmap2", &s.qmap2()},
            };
            for (const auto& [key, buffer] : buffers) {
                if (buffer->defined()) {
                    out[prefix + key] = snapshot(*buffer);
                }
            }
        }
    }
    return out;
}

void AdamW8bit::load_state_tensors(const std::map<std::string, torch::Tensor>& tensors) {
    at::NoGradGuard no_grad;
    const std::string who = name() + "::load_state_tensors";
    std::set<std::string> used;
    // The entry `key`, checked against the dtype and element count expected; `hint` ends the messages.
    const auto entry = [&](const std::string& key, at::ScalarType dtype, int64_t numel,
                           const std::string& hint) -> const at::Tensor& {
        const auto it = tensors.find(key);
        TORCH_CHECK(
            it != tensors.end(), who, ": missing key '", key, "' (expected ", dtype_name(dtype), " with ", numel,
            numel == 1 ? " element)" : " elements)", hint
        );
        const at::Tensor& t = it->second;
        TORCH_CHECK_VALUE(t.defined(), who, ": '", key, "' is an undefined tensor");
        TORCH_CHECK_TYPE(
            t.scalar_type() == dtype, who, ": '", key, "' is ", dtype_name(t.scalar_type()), ", expected ",
            dtype_name(dtype), hint
        );
        TORCH_CHECK_VALUE(
            t.numel() == numel, who, ": '", key, "' has ", t.numel(), " elements (shape ", t.sizes(), "), expected ",
            numel, hint
        );
        used.insert(key);
        return t;
    };

    // Everything is read and checked into new objects first, so a bad checkpoint leaves this optimizer unchanged.
    std::vector<AdamW8bitOptions> options;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        const std::string g = "param_groups." + std::to_string(gi) + ".";
        const std::array<std::string, 5> keys = {g + "lr", g + "beta1", g + "beta2", g + "eps", g + "weight_decay"};
        std::array<double, 5> v{};
        std::array<std::string, 5> quoted;
        for (size_t k = 0; k < keys.size(); ++k) {
            v[k] = entry(keys[k], at::kDouble, 1, "").item<double>();
            quoted[k] = "'" + keys[k] + "'";
        }
        check_hyper(who, "", Hyper{v[0], v[1], v[2], v[3], v[4]}, quoted);
        AdamW8bitOptions o = static_cast<const AdamW8bitOptions&>(param_groups_[gi].options());
        o.lr(v[0]).betas(std::make_tuple(v[1], v[2])).eps(v[3]).weight_decay(v[4]);
        options.push_back(o);
    }

    std::vector<std::pair<void*, AdamW8bitParamState>> states;
    int64_t index = 0;
    size_t num_params = 0;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        const auto& params = param_groups_[gi].params();
        num_params += params.size();
        for (size_t pi = 0; pi < params.size(); ++pi) {
            const at::Tensor& param = params[pi];
            const std::string prefix = "state." + std::to_string(index++) + ".";
            if (tensors.count(prefix + "step") == 0) {
                continue; // no saved state: starts fresh (stray keys of this index are reported below)
            }
            check_param(who, param, gi, pi);
            const std::string hint = std::string("; this optimizer keeps ") + (uses_8bit(param) ? "8-bit" : "float32") +
                                     " states for parameter " + std::to_string(pi) + " of param group " +
                                     std::to_string(gi) + " (optim_bits or min_8bit_size differ?)";
            const int64_t step = entry(prefix + "step", at::kLong, 1, "").item<int64_t>();
            TORCH_CHECK_VALUE(step >= 0, who, ": '", prefix, "step' must be >= 0, got ", step);
            AdamW8bitParamState s = fresh_state(param);
            s.step(step);
            const std::pair<const char*, at::Tensor*> buffers[] = {
                {"state1", &s.state1()},   {"state2", &s.state2()}, {"absmax1", &s.absmax1()},
                {"absmax2", &s.absmax2()}, {"qmap1", &s.qmap1()},   {"qmap2", &s.qmap2()},
            };
            for (const auto& [key, buffer] : buffers) {
                if (buffer->defined()) {
                    const at::Tensor& saved = entry(prefix + key, buffer->scalar_type(), buffer->numel(), hint);
                    buffer->copy_(saved.reshape(buffer->sizes()));
                }
            }
            states.emplace_back(param.unsafeGetTensorImpl(), std::move(s));
        }
    }
    for (const auto& kv : tensors) {
        TORCH_CHECK(
            used.count(kv.first) == 1, who, ": unexpected key '", kv.first, "' (this optimizer has ",
            param_groups_.size(), " param groups and ", num_params, " parameters, with ",
            config_.optim_bits() == 8 ? "8-bit states from " + std::to_string(config_.min_8bit_size()) + " elements"
                                      : std::string("float32 states"),
            ")"
        );
    }

    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        static_cast<AdamW8bitOptions&>(param_groups_[gi].options()) = options[gi];
        for (const at::Tensor& param : param_groups_[gi].params()) {
            state_.erase(param.unsafeGetTensorImpl());
        }
    }
    for (auto& [key, s] : states) {
        state_[key] = std::make_unique<AdamW8bitParamState>(std::move(s));
    }
}

} // namespace qlora::optim
