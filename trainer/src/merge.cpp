// trainer/src/merge.cpp: see qlora/trainer/merge.h.
#include "qlora/trainer/merge.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "qlora/trainer/adapters.h"
#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/bnb_nf4.h"
#include "qlora/trainer/checkpoint.h"

namespace qlora::llama {
namespace {

at::ScalarType dtype_of(const std::string& name) {
    if (name == "bfloat16") {
        return at::kBFloat16;
    }
    if (name == "float16") {
        return at::kHalf;
    }
    return at::kFloat; // float32, and the dense parts of nf4
}

std::string output_dtype(const MergeOptions& opt, const LlamaConfig& base) {
    std::string d = opt.dtype;
    if (d == "bf16") {
        d = "bfloat16";
    } else if (d == "fp16") {
        d = "float16";
    } else if (d == "fp32") {
        d = "float32";
    }
    if (d.empty()) {
        d = base.torch_dtype == "bfloat16" || base.torch_dtype == "float16" ? base.torch_dtype : "float32";
    }
    if (d != "bfloat16" && d != "float16" && d != "float32" && d != "nf4") {
        throw std::runtime_error("merge: --dtype must be bf16, fp16, fp32 or nf4, got '" + opt.dtype + "'");
    }
    if (d == "nf4" && !opt.force) {
        throw std::runtime_error(
            "merge: merging into 4-bit re-quantizes the merged weights, which rounds away part of the adapter's "
            "update; pass --force to do it anyway (the rounding cost is printed), or merge to bf16/fp16/fp32"
        );
    }
    return d;
}

// Every projection of the architecture: module name -> {out, in}.
std::map<std::string, std::pair<int64_t, int64_t>> projection_shapes(const LlamaConfig& c) {
    static const std::set<std::string> kLeaves = {"q_proj",    "k_proj",  "v_proj",    "o_proj",
                                                  "gate_proj", "up_proj", "down_proj", "lm_head"};
    std::map<std::string, std::pair<int64_t, int64_t>> out;
    for (const auto& [name, shape] : expected_tensors(c)) {
        const std::string suffix = ".weight";
        if (shape.size() != 2 || name.size() <= suffix.size() ||
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
            continue;
        }
        const std::string module = name.substr(0, name.size() - suffix.size());
        if (kLeaves.count(module.substr(module.find_last_of('.') + 1)) != 0) {
            out.emplace(module, std::make_pair(shape[0], shape[1]));
        }
    }
    return out;
}

} // namespace

MergedModel merge_tensors(const MergeOptions& opt) {
    MergedModel out;
    out.config = load_config(opt.base_dir);
    const safetensors::Checkpoint base = safetensors::Checkpoint::open(opt.base_dir);
    check_checkpoint(out.config, base);
    out.dtype = output_dtype(opt, out.config);
    const LoraSpec spec = read_adapter_config(opt.adapter_dir);
    const double scale = lora_scale(spec);
    const auto lora = read_adapter_weights(opt.adapter_dir, spec, projection_shapes(out.config), at::kFloat);
    std::optional<safetensors::Checkpoint> dense;
    if (!opt.dense_dir.empty()) {
        dense = safetensors::Checkpoint::open(opt.dense_dir);
        check_checkpoint(out.config, *dense); // same architecture and shapes
    }
    const safetensors::Checkpoint& src = dense ? *dense : base;
    const at::ScalarType dense_dtype = dtype_of(out.dtype);
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto& [name, shape] : expected_tensors(out.config)) {
        shapes.emplace(name, shape);
    }
    torch::NoGradGuard no_grad;
    for (const std::string& name : src.names_in_storage_order()) {
        const auto shape = shapes.find(name);
        if (shape == shapes.end()) {
            continue; // quant-state tensors (read with their weight), an old rotary inv_freq
        }
        const bool is4 = qlora::bnb::is_nf4(src, name);
        if (dense && is4) {
            throw std::runtime_error(opt.dense_dir + ": " + name + " is stored 4-bit; --base-dense must be dense");
        }
        const std::string module = name.substr(0, name.size() - std::string(".weight").size());
        const auto update = lora.find(module);
        at::Tensor w;
        if (is4) {
            w = qlora::nf4_dequantize(qlora::bnb::read_nf4(src, name, shape->second), at::kFloat);
        } else if (update != lora.end() && !dense && !opt.dense_base) {
            // The weight the adapter was trained on: quantized as qlora's loader does, then dequantized.
            const qlora::Nf4Tensor q = qlora::nf4_quantize(src.read(name), spec.blocksize, spec.double_quant);
            w = qlora::nf4_dequantize(q, at::kFloat);
        } else {
            w = src.read(name).to(at::kFloat);
        }
        if (update != lora.end()) {
            w = w + at::matmul(update->second.second, update->second.first) * scale; // W + s · B A, float32
            out.merged_modules.push_back(module);
            out.tensors.emplace_back(name, out.dtype == "nf4" ? w : w.to(dense_dtype));
        } else {
            out.tensors.emplace_back(name, w.to(dense_dtype));
        }
    }
    if (out.merged_modules.size() != lora.size()) {
        throw std::runtime_error(opt.adapter_dir + ": some adapter modules have no weight in " + src.dir());
    }
    return out;
}

double
write_merged(const MergedModel& merged, const MergeOptions& opt, const std::string& out_dir, uint64_t max_shard_bytes) {
    if (std::filesystem::exists(out_dir)) {
        throw std::runtime_error(
            out_dir + ": already exists; merge writes a new directory (remove it or pick another)"
        );
    }
    const LoraSpec spec = read_adapter_config(opt.adapter_dir);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    nlohmann::json quantization = nullptr;
    std::string dtype_name = merged.dtype;
    double err2 = 0.0, norm2 = 0.0; // rounding of the merged weights to NF4 (dtype nf4)
    if (merged.dtype == "nf4") {
        dtype_name = "float32";
        const std::set<std::string> merged_set(merged.merged_modules.begin(), merged.merged_modules.end());
        std::set<std::string> dense_leaves;
        for (const auto& [module, unused] : projection_shapes(merged.config)) {
            if (merged_set.count(module) == 0) {
                dense_leaves.insert(module.substr(module.find_last_of('.') + 1));
            }
        }
        if (merged.config.tie_word_embeddings) {
            dense_leaves.insert("lm_head");
        }
        for (const auto& [name, w] : merged.tensors) {
            const std::string module = name.substr(0, name.size() - std::string(".weight").size());
            if (merged_set.count(module) == 0) {
                tensors.emplace_back(name, w);
                continue;
            }
            qlora::Nf4Tensor q = qlora::nf4_quantize(w, spec.blocksize, spec.double_quant);
            q.dtype = at::kFloat;
            err2 += (qlora::nf4_dequantize(q, at::kFloat) - w).pow(2).sum().item<double>();
            norm2 += w.pow(2).sum().item<double>();
            for (auto& t : qlora::bnb::nf4_tensors(name, q)) {
                tensors.push_back(std::move(t));
            }
        }
        quantization =
            qlora::bnb::quantization_config(at::kFloat, spec.double_quant, qlora::bnb::skip_modules(dense_leaves));
    } else {
        tensors = merged.tensors;
    }
    qlora::trainer::write_directory_atomically(out_dir, [&](const std::string& dir) {
        safetensors::save_checkpoint(dir, tensors, max_shard_bytes);
        const std::string text = config_json(merged.config, dtype_name, quantization).dump(2) + "\n";
        qlora::trainer::write_file_atomically((std::filesystem::path(dir) / "config.json").string(), [&](auto& sink) {
            sink.write(text.data(), text.size());
        });
        for (const char* f :
             {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json"}) {
            std::filesystem::path from = std::filesystem::path(opt.base_dir) / f;
            if (!std::filesystem::is_regular_file(from) && std::string(f) == "tokenizer.model" &&
                !opt.tokenizer.empty()) {
                from = opt.tokenizer;
            }
            if (!std::filesystem::is_regular_file(from)) {
                continue;
            }
            std::ifstream in(from, std::ios::binary);
            std::stringstream ss;
            ss << in.rdbuf();
            if (!in.good() && !in.eof()) {
                throw std::runtime_error(from.string() + ": cannot read");
            }
            const std::string bytes = ss.str();
            qlora::trainer::write_file_atomically((std::filesystem::path(dir) / f).string(), [&](auto& sink) {
                sink.write(bytes.data(), bytes.size());
            });
        }
    });
    return norm2 > 0.0 ? std::sqrt(err2 / norm2) : 0.0;
}

LlamaForCausalLM merged_model(const MergedModel& merged, at::ScalarType compute_dtype) {
    TORCH_CHECK(merged.dtype != "nf4", "merged_model: an nf4 merge has no dense model (load the written directory)");
    LlamaForCausalLM m(merged.config, Init::kEmpty);
    std::map<std::string, at::Tensor> params;
    for (auto& item : m->named_parameters()) {
        params.emplace(item.key(), item.value());
    }
    torch::NoGradGuard no_grad;
    for (const auto& [name, w] : merged.tensors) {
        const auto p = params.find(name);
        TORCH_CHECK(p != params.end(), "merged_model: no parameter ", name);
        p->second.set_data(w.to(compute_dtype));
        params.erase(p);
    }
    TORCH_CHECK(params.empty(), "merged_model: ", params.size(), " parameters missing, e.g. ", params.begin()->first);
    return m;
}

ProbeResult probe_logits(LlamaForCausalLM& a, LlamaForCausalLM& b) {
    const LlamaConfig& c = a->model->config;
    const int64_t T = std::min<int64_t>(32, c.max_position_embeddings);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1234);
    const at::Tensor ids = at::randint(c.vocab_size, {2, T}, gen, at::TensorOptions(at::kLong));
    torch::NoGradGuard no_grad;
    a->eval();
    b->eval();
    const at::Tensor la = a->forward(ids).to(at::kFloat), lb = b->forward(ids).to(at::kFloat);
    ProbeResult r;
    r.max_abs_diff = (la - lb).abs().max().item<double>();
    r.max_abs_logit = la.abs().max().item<double>();
    r.logits = la.numel();
    return r;
}

} // namespace qlora::llama
