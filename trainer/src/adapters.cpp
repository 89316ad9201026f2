// trainer/src/adapters.cpp: see qlora/trainer/adapters.h.
#include "qlora/trainer/adapters.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <stdexcept>

#include <ATen/ATen.h>

#include "qlora/trainer/safetensors.h"

namespace qlora::llama {

AdapterSet::AdapterSet(LlamaForCausalLM model) : model_(std::move(model)) {
    TORCH_CHECK(
        !model_->lora.has_value(), "AdapterSet: the model has LoRA layers of its own (load it with add_lora = false)"
    );
    dtype_ = model_->model->embed_tokens->weight.scalar_type();
    for (auto& item : model_->named_modules()) {
        if (auto* proj = item.value()->as<Projection>()) {
            projections_.emplace(item.key(), proj);
        }
    }
}

double lora_scale(const LoraSpec& spec) {
    return spec.use_rslora ? spec.lora_alpha / std::sqrt(static_cast<double>(spec.r))
                           : spec.lora_alpha / static_cast<double>(spec.r);
}

std::map<std::string, std::pair<at::Tensor, at::Tensor>> read_adapter_weights(
    const std::string& dir, const LoraSpec& spec, const std::map<std::string, std::pair<int64_t, int64_t>>& projections,
    at::ScalarType dtype
) {
    const std::string weights = (std::filesystem::path(dir) / "adapter_model.safetensors").string();
    const safetensors::File file = safetensors::File::open(weights);
    const std::string prefix = "base_model.model.";
    const auto ends_with = [](const std::string& s, const std::string& tail) {
        return s.size() > tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
    };
    std::map<std::string, std::pair<at::Tensor, at::Tensor>> out;
    for (const safetensors::TensorInfo& t : file.header().tensors) {
        const bool is_a = ends_with(t.name, ".lora_A.weight");
        const bool is_b = ends_with(t.name, ".lora_B.weight");
        if (t.name.rfind(prefix, 0) != 0 || !(is_a || is_b)) {
            throw std::runtime_error(
                weights + ": tensor " + t.name + " is not base_model.model.<module>.lora_{A,B}.weight"
            );
        }
        const std::string module = t.name.substr(prefix.size(), t.name.size() - prefix.size() - 14);
        const auto proj = projections.find(module);
        if (proj == projections.end()) {
            throw std::runtime_error(weights + ": " + t.name + " names module " + module + ", which the model lacks");
        }
        const auto [out_f, in_f] = proj->second;
        const std::vector<int64_t> want =
            is_a ? std::vector<int64_t>{spec.r, in_f} : std::vector<int64_t>{out_f, spec.r};
        if (t.shape != want) {
            throw std::runtime_error(
                weights + ": " + t.name + " has shape " + c10::str(c10::IntArrayRef(t.shape)) + " but module " +
                module + " with r = " + std::to_string(spec.r) + " expects " + c10::str(c10::IntArrayRef(want))
            );
        }
        auto& slot = out[module];
        (is_a ? slot.first : slot.second) = file.tensor(t.name).to(dtype).clone(); // owned: the file closes below
    }
    for (const auto& [module, unused] : projections) {
        const std::string leaf = module.substr(module.find_last_of('.') + 1);
        const bool targeted =
            std::find(spec.target_modules.begin(), spec.target_modules.end(), leaf) != spec.target_modules.end();
        const auto it = out.find(module);
        if (targeted && (it == out.end() || !it->second.first.defined() || !it->second.second.defined())) {
            throw std::runtime_error(weights + ": no lora_A and lora_B for module " + module + " (a target)");
        }
        if (!targeted && it != out.end()) {
            throw std::runtime_error(
                weights + ": module " + module + " has LoRA weights but is not in target_modules of its config"
            );
        }
    }
    return out;
}

void AdapterSet::add(const std::string& name, const std::string& dir) {
    TORCH_CHECK(!name.empty() && name != "none", "AdapterSet: an adapter cannot be named '", name, "'");
    for (const auto& entry : adapters_) {
        TORCH_CHECK(entry.first != name, "AdapterSet: an adapter named '", name, "' is loaded already");
    }
    Adapter a;
    a.spec = read_adapter_config(dir);
    a.scale = lora_scale(a.spec);
    std::map<std::string, std::pair<int64_t, int64_t>> shapes;
    for (const auto& [module, proj] : projections_) {
        shapes.emplace(module, std::make_pair(proj->out_features, proj->in_features));
    }
    a.modules = read_adapter_weights(dir, a.spec, shapes, dtype_);
    adapters_.emplace_back(name, std::move(a));
}

void AdapterSet::activate(const std::string& name) {
    const Adapter* chosen = nullptr;
    if (name != "none") {
        for (const auto& [have, a] : adapters_) {
            if (have == name) {
                chosen = &a;
            }
        }
        if (chosen == nullptr) {
            std::string known = "none";
            for (const auto& entry : adapters_) {
                known += ", " + entry.first;
            }
            throw std::runtime_error("no adapter named '" + name + "' (loaded: " + known + ")");
        }
    }
    for (auto& [module, proj] : projections_) {
        proj->clear_swapped_lora();
        if (chosen == nullptr) {
            continue;
        }
        const auto it = chosen->modules.find(module);
        if (it != chosen->modules.end()) {
            proj->set_swapped_lora(it->second.first, it->second.second, chosen->scale);
        }
    }
    active_ = name;
}

std::vector<std::string> AdapterSet::names() const {
    std::vector<std::string> out;
    for (const auto& entry : adapters_) {
        out.push_back(entry.first);
    }
    return out;
}

std::vector<std::string> adapter_targets(const std::vector<std::string>& dirs) {
    std::set<std::string> all;
    for (const std::string& d : dirs) {
        for (const std::string& t : read_adapter_config(d).target_modules) {
            all.insert(t);
        }
    }
    return {all.begin(), all.end()};
}

} // namespace qlora::llama
