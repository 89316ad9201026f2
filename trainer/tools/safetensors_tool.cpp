// trainer/tools/safetensors_tool.cpp: `qlora_safetensors`, the driver through which the Python tests and benchmarks
// exercise the trainer library against the reference implementations (safetensors, transformers, PEFT,
// bitsandbytes). Exit status 1 and a one-line message on stderr for a rejected input.
//
//   check FILE                      validate a file with qlora's reader and list its tensors
//   copy IN OUT                     read every tensor and write them with qlora's writer
//   model DIR                       read a Hugging Face Llama directory, check weights against config, print config
//   logits DIR OUT ID...            forward one sequence, logits (float32) saved to OUT as "logits"
//   qlogits DIR OUT ID...           the same with --nf4=all
//   adapter DIR ADAPTER OUT ID...   NF4 + LoRA (r 4, alpha 8; q_proj, v_proj, down_proj; seeded random B), adapter
//                                   saved in PEFT format to ADAPTER, logits to OUT
//   load-adapter DIR ADAPTER OUT ID...   logits with a PEFT adapter (--adapter=ADAPTER)
//   grads DIR ADAPTER OUT ID...     Hugging Face's causal-LM loss of one sequence (labels = ids) with the adapter,
//                                   in training mode; its LoRA gradients (PEFT key names) and "loss" saved to OUT
//   save-model DIR OUT              load (options below) and write with save_model
//   load-bench DIR                  load_model and print one JSON line: seconds, peak RSS, model bytes
// Options (anywhere): --dtype=float32|bfloat16, --nf4=all|NAME,... (NF4 + LoRA targets, r 8, B = 0),
// --adapter=DIR, --dense-lora (the adapter's targets stay dense: plain LoRA), --checkpointing (activation
// checkpointing), --shard-bytes=N.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include "qlora/trainer/checkpoint.h"
#include "qlora/trainer/llama.h"
#include "qlora/trainer/llama_config.h"
#include "qlora/trainer/memory.h"
#include "qlora/trainer/safetensors.h"

namespace st = qlora::safetensors;
namespace ll = qlora::llama;

namespace {

struct Args {
    std::string cmd;
    std::vector<std::string> pos;
    std::map<std::string, std::string> opt;
    std::string get(const std::string& k, const std::string& def = "") const {
        const auto it = opt.find(k);
        return it == opt.end() ? def : it->second;
    }
};

std::vector<int64_t> ids_from(const Args& a, size_t first) {
    std::vector<int64_t> ids;
    for (size_t i = first; i < a.pos.size(); ++i) {
        ids.push_back(std::stoll(a.pos[i]));
    }
    return ids;
}

ll::LoadOptions load_options(const Args& a) {
    ll::LoadOptions o;
    const std::string dtype = a.get("dtype", "float32");
    if (dtype != "float32" && dtype != "bfloat16") {
        throw std::runtime_error("--dtype must be float32 or bfloat16, got " + dtype);
    }
    o.dtype = dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
    const std::string nf4 = a.get("nf4");
    if (!nf4.empty()) {
        ll::LoraSpec spec;
        if (nf4 != "all") {
            spec.target_modules.clear();
            std::stringstream s(nf4);
            for (std::string t; std::getline(s, t, ',');) {
                spec.target_modules.push_back(t);
            }
        }
        o.lora = spec;
    }
    return o;
}

ll::LlamaForCausalLM load(const Args& a, const std::string& dir) {
    ll::LlamaForCausalLM m = ll::load_model(dir, load_options(a));
    if (!a.get("adapter").empty()) {
        ll::load_adapter(m, a.get("adapter"), a.opt.count("dense-lora") == 0);
    }
    m->model->gradient_checkpointing = a.opt.count("checkpointing") != 0;
    return m;
}

int run(const Args& a) {
    const auto need = [&](size_t n, bool more = false) {
        if (a.pos.size() < n || (!more && a.pos.size() != n)) {
            throw std::invalid_argument("usage");
        }
    };
    if (a.cmd == "logits" || a.cmd == "qlogits" || a.cmd == "load-adapter") {
        Args b = a;
        if (a.cmd == "qlogits") {
            b.opt["nf4"] = "all";
        }
        size_t first = 2;
        if (a.cmd == "load-adapter") {
            need(3, true);
            b.opt["adapter"] = a.pos[1];
            b.pos.erase(b.pos.begin() + 1);
        }
        need(first, true);
        ll::LlamaForCausalLM m = load(b, b.pos[0]);
        m->eval();
        torch::NoGradGuard no_grad;
        const at::Tensor logits = m->forward(torch::tensor(ids_from(b, first)).view({1, -1}));
        st::save(b.pos[1], {{"logits", logits.to(at::kFloat)}});
        return 0;
    }
    if (a.cmd == "adapter") {
        need(3, true);
        ll::LlamaForCausalLM m = ll::load_model(a.pos[0], load_options(a));
        ll::LoraSpec spec;
        spec.r = 4;
        spec.lora_alpha = 8.0;
        spec.target_modules = {"q_proj", "v_proj", "down_proj"};
        torch::manual_seed(7);
        ll::apply_qlora(m, spec);
        {
            torch::NoGradGuard no_grad;
            for (auto& item : m->named_parameters()) {
                if (item.key().find("lora_B") != std::string::npos) {
                    item.value().normal_(0.0, 0.1);
                }
            }
        }
        ll::save_adapter(m, a.pos[1], a.pos[0]);
        torch::NoGradGuard no_grad;
        st::save(a.pos[2], {{"logits", m->forward(torch::tensor(ids_from(a, 3)).view({1, -1})).to(at::kFloat)}});
        return 0;
    }
    if (a.cmd == "grads") {
        need(4, true);
        Args b = a;
        b.opt["adapter"] = a.pos[1];
        ll::LlamaForCausalLM m = load(b, a.pos[0]);
        m->train();
        const at::Tensor ids = torch::tensor(ids_from(a, 3)).view({1, -1});
        const int64_t T = ids.size(1);
        // transformers' ForCausalLMLoss: logits upcast to float32, shifted by one, mean over the tokens.
        const at::Tensor logits = m->forward(ids).to(at::kFloat);
        const at::Tensor loss = at::cross_entropy_loss(logits[0].narrow(0, 0, T - 1), ids[0].narrow(0, 1, T - 1));
        loss.backward();
        std::vector<std::pair<std::string, at::Tensor>> out = {{"loss", loss.detach()}};
        for (const auto& item : m->named_parameters()) {
            if (item.value().requires_grad()) {
                out.emplace_back("base_model.model." + item.key(), item.value().grad());
            }
        }
        st::save(a.pos[2], out);
        return 0;
    }
    if (a.cmd == "save-model") {
        need(2);
        const ll::LlamaForCausalLM m = ll::load_model(a.pos[0], load_options(a));
        const std::string shard = a.get("shard-bytes");
        ll::save_model(m, a.pos[1], shard.empty() ? uint64_t{5} << 30 : std::stoull(shard));
        return 0;
    }
    if (a.cmd == "load-bench") {
        need(1);
        const int64_t rss_before = qlora::trainer::peak_resident_bytes();
        const auto t0 = std::chrono::steady_clock::now();
        const ll::LlamaForCausalLM m = ll::load_model(a.pos[0], load_options(a));
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        int64_t nf4_bytes = 0, dense_bytes = 0, params = 0;
        for (const auto& item : m->named_modules()) {
            if (const auto* p = item.value()->as<ll::Projection>(); p != nullptr && p->quantized()) {
                for (const at::Tensor& t : {p->nf4.packed, p->nf4.absmax, p->nf4.nested_absmax, p->nf4.nested_code}) {
                    nf4_bytes += t.defined() ? static_cast<int64_t>(t.nbytes()) : 0;
                }
                params += p->nf4.numel();
            }
        }
        for (const auto& item : m->named_parameters()) {
            dense_bytes += static_cast<int64_t>(item.value().nbytes());
            params += item.value().numel();
        }
        std::printf(
            "{\"seconds\": %.3f, \"peak_rss_bytes\": %lld, \"rss_before_load_bytes\": %lld, \"nf4_bytes\": %lld, "
            "\"dense_bytes\": %lld, \"parameters\": %lld}\n",
            seconds, static_cast<long long>(qlora::trainer::peak_resident_bytes()), static_cast<long long>(rss_before),
            static_cast<long long>(nf4_bytes), static_cast<long long>(dense_bytes), static_cast<long long>(params)
        );
        return 0;
    }
    if (a.cmd == "model") {
        need(1);
        const ll::LlamaConfig c = ll::load_config(a.pos[0]);
        const st::Checkpoint ck = st::Checkpoint::open(a.pos[0]);
        ll::check_checkpoint(c, ck);
        const char* rope[] = {"default", "linear", "llama3"};
        std::printf(
            "vocab_size=%lld hidden_size=%lld intermediate_size=%lld layers=%lld heads=%lld kv_heads=%lld "
            "head_dim=%lld rope_theta=%g rope=%s factor=%g tie=%d tensors=%zu\n",
            static_cast<long long>(c.vocab_size), static_cast<long long>(c.hidden_size),
            static_cast<long long>(c.intermediate_size), static_cast<long long>(c.num_hidden_layers),
            static_cast<long long>(c.num_attention_heads), static_cast<long long>(c.num_key_value_heads),
            static_cast<long long>(c.head_dim), c.rope_theta, rope[static_cast<int>(c.rope_scaling.type)],
            c.rope_scaling.factor, c.tie_word_embeddings ? 1 : 0, ck.names().size()
        );
        return 0;
    }
    if (a.cmd == "check") {
        need(1);
        const st::File f = st::File::open(a.pos[0]);
        for (const st::TensorInfo& t : f.header().tensors) {
            std::printf("%s %s [", t.name.c_str(), st::dtype_name(t.dtype));
            for (size_t i = 0; i < t.shape.size(); ++i) {
                std::printf("%s%lld", i ? "," : "", static_cast<long long>(t.shape[i]));
            }
            std::printf("]\n");
        }
        return 0;
    }
    if (a.cmd == "copy") {
        need(2);
        const st::File f = st::File::open(a.pos[0]);
        std::vector<std::pair<std::string, at::Tensor>> tensors;
        for (const st::TensorInfo& t : f.header().tensors) {
            tensors.emplace_back(t.name, f.tensor(t.name));
        }
        st::save(a.pos[1], tensors, f.header().metadata);
        return 0;
    }
    throw std::invalid_argument("usage");
}

} // namespace

int main(int argc, char** argv) {
    Args a;
    a.cmd = argc > 1 ? argv[1] : "";
    for (int i = 2; i < argc; ++i) {
        const std::string s = argv[i];
        if (s.rfind("--", 0) == 0) {
            const size_t eq = s.find('=');
            a.opt[s.substr(2, eq == std::string::npos ? std::string::npos : eq - 2)] =
                eq == std::string::npos ? "1" : s.substr(eq + 1);
        } else {
            a.pos.push_back(s);
        }
    }
    try {
        return run(a);
    } catch (const std::invalid_argument&) {
        std::fprintf(
            stderr, "usage: qlora_safetensors check|copy|model|logits|qlogits|adapter|load-adapter|grads|save-model|"
                    "load-bench ... (see trainer/tools/safetensors_tool.cpp)\n"
        );
        return 2;
    } catch (const c10::Error& e) { // without the C++ backtrace: one line
        std::fprintf(stderr, "%s\n", e.what_without_backtrace());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
