// qlora/trainer/adapters.h: several LoRA adapters over one frozen base model, switched without reloading the base.
//
// An AdapterSet holds a LlamaForCausalLM without LoRA parameters of its own (load_model with add_lora = false: the
// targets quantized to NF4) and any number of PEFT adapter directories read into memory. activate(name) points every
// targeted projection at that adapter's A, B and scale (ProjectionImpl::set_swapped_lora; nothing is copied or
// re-quantized) and clears the others; activate("none") gives the base model. Each adapter is checked against the
// model when added: every tensor must name a projection of the model with matching shapes and every target projection
// must get both matrices, else a one-line error naming the file and the module.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qlora/trainer/llama.h"

namespace qlora::llama {

class AdapterSet {
  public:
    explicit AdapterSet(LlamaForCausalLM model);

    // Reads the PEFT adapter directory `dir` under `name` (not "none", not already taken). The compute dtype of the
    // matrices is the model's; the active adapter is unchanged.
    void add(const std::string& name, const std::string& dir);
    // Makes `name` the active adapter ("none": no adapter); throws naming the known adapters for an unknown name.
    void activate(const std::string& name);

    const std::string& active() const { return active_; }
    std::vector<std::string> names() const; // in the order added
    LlamaForCausalLM& model() { return model_; }

  private:
    struct Adapter {
        LoraSpec spec;
        double scale = 0.0; // alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT)
        std::map<std::string, std::pair<at::Tensor, at::Tensor>> modules; // module -> (A [r, in], B [out, r])
    };
    LlamaForCausalLM model_;
    std::map<std::string, ProjectionImpl*> projections_; // module name -> projection
    std::vector<std::pair<std::string, Adapter>> adapters_;
    std::string active_ = "none";
    at::ScalarType dtype_;
};

// The LoRA matrices of a PEFT adapter directory whose config is `spec`, checked against the model's projections
// (module name -> {out_features, in_features}): every tensor is base_model.model.<module>.lora_{A,B}.weight of a known
// projection with shapes [r, in] / [out, r], every projection whose leaf name is a target gets both, no other does.
// Returned per module as (A, B), converted to `dtype`, owning their memory. Errors name the file and the module.
std::map<std::string, std::pair<at::Tensor, at::Tensor>> read_adapter_weights(
    const std::string& dir, const LoraSpec& spec, const std::map<std::string, std::pair<int64_t, int64_t>>& projections,
    at::ScalarType dtype
);

// PEFT's scale of an adapter: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
double lora_scale(const LoraSpec& spec);

// The union of the target modules of the adapter directories (their adapter_config.json), for loading a base whose
// projections serve all of them (LoadOptions::lora with add_lora = false).
std::vector<std::string> adapter_targets(const std::vector<std::string>& dirs);

} // namespace qlora::llama
