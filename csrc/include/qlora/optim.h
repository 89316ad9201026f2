// qlora/optim.h: bitsandbytes-compatible 8-bit and 32-bit (paged) AdamW as a torch::optim::Optimizer, for LibTorch
// programs. The C++ twin of python/qlora/optim.py: same state names, the same rules for which tensors get 8-bit or
// paged states, the same update (Note [AdamW8 update order] in csrc/core/adamw.h), so both front ends produce the
// same bits from the same inputs.
//
//   qlora::optim::AdamW8bit opt(model->parameters(), qlora::optim::AdamW8bitOptions(2e-4).weight_decay(0.0));
//   torch::optim::StepLR sched(opt, /*step_size=*/100, /*gamma=*/0.5); // schedulers drive each group's lr
//   loss.backward(); opt.step(); sched.step();
//
// Per parameter (bitsandbytes' layout, spec nf4-and-optimizer.md §4.2): `step`, and either 8-bit states (state1,
// state2 uint8 codes shaped like the parameter; absmax1, absmax2 float32 [ceil(n / 256)]; qmap1, qmap2 the signed and
// unsigned dynamic maps, float32 [256]) when optim_bits == 8 and numel >= min_8bit_size, or float32 moments state1
// (m) and state2 (v) shaped like the parameter. With `paged`, the moments of tensors of at least page_min_size
// elements live in managed memory on CUDA (qlora::paged_zeros) and are prefetched before each update; results are
// identical to the non-paged optimizer, and on the CPU paging changes nothing.
//
// Checkpoints: no pickle (torch::serialize archives are refused by save/load). state_tensors() gives named tensors
// for safetensors, load_state_tensors() restores them into buffers this optimizer allocates itself, so paged and
// non-paged optimizers load each other's states.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/optim/optimizer.h>

namespace qlora::optim {

// Per-group hyperparameters (torch::optim::AdamWOptions without amsgrad). Weight decay is decoupled and applied after
// the Adam step. A param group given its own options uses them as given: unlike torch's built-in optimizers, fields
// left at their default are not taken from the optimizer's defaults.
struct AdamW8bitOptions : public torch::optim::OptimizerCloneableOptions<AdamW8bitOptions> {
    AdamW8bitOptions(double lr = 1e-3) : lr_(lr) {}
    TORCH_ARG(double, lr) = 1e-3;
    using betas_t = std::tuple<double, double>;
    TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
    TORCH_ARG(double, eps) = 1e-8;
    TORCH_ARG(double, weight_decay) = 1e-2;

  public:
    // torch::serialize (pickle) is not supported: both throw, pointing to AdamW8bit::state_tensors().
    void serialize(torch::serialize::InputArchive& archive) override;
    void serialize(torch::serialize::OutputArchive& archive) const override;
    friend bool operator==(const AdamW8bitOptions& lhs, const AdamW8bitOptions& rhs);
    double get_lr() const override;
    void set_lr(const double lr) override;
};

// Optimizer-wide settings: they decide the state layout of every tensor, so they are not per group.
struct AdamW8bitConfig {
    TORCH_ARG(int64_t, optim_bits) = 8;         // 8: 8-bit states (for tensors >= min_8bit_size); 32: float32 states
    TORCH_ARG(bool, paged) = false;             // managed-memory moments on CUDA for tensors >= page_min_size
    TORCH_ARG(int64_t, min_8bit_size) = 4096;   // smaller tensors keep float32 states, as in bitsandbytes
    TORCH_ARG(int64_t, page_min_size) = 100000; // smaller tensors are never paged
};

// One parameter's state; unused tensors (absmax*, qmap* of float32 states) are undefined.
struct AdamW8bitParamState : public torch::optim::OptimizerCloneableParamState<AdamW8bitParamState> {
    TORCH_ARG(int64_t, step) = 0;
    TORCH_ARG(torch::Tensor, state1);
    TORCH_ARG(torch::Tensor, state2);
    TORCH_ARG(torch::Tensor, absmax1);
    TORCH_ARG(torch::Tensor, absmax2);
    TORCH_ARG(torch::Tensor, qmap1);
    TORCH_ARG(torch::Tensor, qmap2);

  public:
    void serialize(torch::serialize::InputArchive& archive) override;
    void serialize(torch::serialize::OutputArchive& archive) const override;
    friend bool operator==(const AdamW8bitParamState& lhs, const AdamW8bitParamState& rhs);
};

// AdamW over qlora::adamw8bit_step / qlora::adamw32bit_step. Parameters must be float32, bfloat16 or float16 and
// contiguous, with gradients of the same dtype; parameters without a gradient are skipped.
class AdamW8bit : public torch::optim::Optimizer {
  public:
    explicit AdamW8bit(
        const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamW8bitOptions defaults = {},
        AdamW8bitConfig config = {}
    );
    explicit AdamW8bit(std::vector<torch::Tensor> params, AdamW8bitOptions defaults = {}, AdamW8bitConfig config = {});

    torch::Tensor step(LossClosure closure = nullptr) override;

    // Adds a group, keeping its own AdamW8bitOptions (torch::optim::Optimizer::add_param_group would replace the
    // options of an optimizer it does not know with the defaults). Call it on the AdamW8bit, not through a base
    // reference.
    void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

    // Both throw: torch::serialize writes pickle, which this project does not use. Use state_tensors().
    void save(torch::serialize::OutputArchive& archive) const override;
    void load(torch::serialize::InputArchive& archive) override;

    // The optimizer state as contiguous CPU copies, e.g. for safetensors:
    //   "state.<i>.step" int64 [], "state.<i>.state1", ".state2" (and ".absmax1", ".absmax2", ".qmap1", ".qmap2" for
    //   8-bit states) for every parameter that has a state, i its position over all groups in order (the ids of
    //   torch's state_dict); "param_groups.<g>.lr", ".beta1", ".beta2", ".eps", ".weight_decay" float64 [].
    std::map<std::string, torch::Tensor> state_tensors() const;

    // Restores state_tensors() output (of this optimizer or of a paged / non-paged one with the same parameters):
    // group hyperparameters, and states copied into freshly allocated buffers (paged or not per this optimizer, on
    // each parameter's device, dtypes unchanged). Parameters without saved state start fresh. A missing, unexpected,
    // wrongly typed or wrongly sized entry throws a c10::Error naming the key, and leaves the optimizer unchanged.
    void load_state_tensors(const std::map<std::string, torch::Tensor>& tensors);

    const AdamW8bitConfig& config() const noexcept { return config_; }
    // "qlora::optim::AdamW8bit", "...::PagedAdamW32bit", ...: the prefix of every error message.
    std::string name() const;

  private:
    bool uses_8bit(const torch::Tensor& param) const;
    bool is_paged(const torch::Tensor& param) const;
    AdamW8bitParamState fresh_state(const torch::Tensor& param) const;

    AdamW8bitConfig config_;
};

// The variants of bitsandbytes and transformers (`paged_adamw_8bit`, `paged_adamw_32bit`): the class fixes
// config.optim_bits and config.paged; min_8bit_size and page_min_size are taken from `config`.
class PagedAdamW8bit : public AdamW8bit {
  public:
    explicit PagedAdamW8bit(
        const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamW8bitOptions defaults = {},
        AdamW8bitConfig config = {}
    )
        : AdamW8bit(param_groups, std::move(defaults), config.optim_bits(8).paged(true)) {}
    explicit PagedAdamW8bit(
        std::vector<torch::Tensor> params, AdamW8bitOptions defaults = {}, AdamW8bitConfig config = {}
    )
        : AdamW8bit(std::move(params), std::move(defaults), config.optim_bits(8).paged(true)) {}
};

class AdamW32bit : public AdamW8bit {
  public:
    explicit AdamW32bit(
        const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamW8bitOptions defaults = {},
        AdamW8bitConfig config = {}
    )
        : AdamW8bit(param_groups, std::move(defaults), config.optim_bits(32).paged(false)) {}
    explicit AdamW32bit(std::vector<torch::Tensor> params, AdamW8bitOptions defaults = {}, AdamW8bitConfig config = {})
        : AdamW8bit(std::move(params), std::move(defaults), config.optim_bits(32).paged(false)) {}
};

class PagedAdamW32bit : public AdamW8bit {
  public:
    explicit PagedAdamW32bit(
        const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamW8bitOptions defaults = {},
        AdamW8bitConfig config = {}
    )
        : AdamW8bit(param_groups, std::move(defaults), config.optim_bits(32).paged(true)) {}
    explicit PagedAdamW32bit(
        std::vector<torch::Tensor> params, AdamW8bitOptions defaults = {}, AdamW8bitConfig config = {}
    )
        : AdamW8bit(std::move(params), std::move(defaults), config.optim_bits(32).paged(true)) {}
};

using PagedAdamW = PagedAdamW32bit; // bitsandbytes' name for the QLoRA paper's optimizer

} // namespace qlora::optim
