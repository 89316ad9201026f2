// trainer/tools/safetensors_tool.cpp: `qlora_safetensors check FILE` validates a file with qlora's reader and prints
// its tensors; `qlora_safetensors copy IN OUT` reads every tensor and writes them with qlora's writer;
// `qlora_safetensors model DIR` reads a Hugging Face Llama directory (config.json + weights, one file or shards),
// checks the weights against the config and prints the parsed config. Exit status 1 and a one-line message on stderr
// for a rejected input. Used by tests/python/test_safetensors_interop.py against the reference `safetensors` package
// and transformers.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qlora/trainer/checkpoint.h"
#include "qlora/trainer/llama.h"
#include "qlora/trainer/llama_config.h"
#include "qlora/trainer/safetensors.h"

namespace st = qlora::safetensors;

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (!((cmd == "check" && argc == 3) || (cmd == "copy" && argc == 4) || (cmd == "model" && argc == 3) ||
          ((cmd == "logits" || cmd == "qlogits") && argc >= 5) ||
          ((cmd == "adapter" || cmd == "load-adapter") && argc >= 6))) {
        std::fprintf(
            stderr,
            "usage: qlora_safetensors check FILE | copy IN OUT | model DIR | logits|qlogits DIR OUT ID... | adapter "
            "DIR ADAPTER_DIR OUT ID... | load-adapter DIR ADAPTER_DIR OUT ID...\n"
        );
        return 2;
    }
    try {
        if (cmd == "load-adapter") { // base + a PEFT adapter (NF4 targets from its config), float32 logits to OUT
            const qlora::llama::LlamaConfig c = qlora::llama::load_config(argv[2]);
            qlora::llama::LlamaForCausalLM m(c);
            qlora::llama::load_weights(m, st::Checkpoint::open(argv[2]), at::kFloat);
            qlora::llama::load_adapter(m, argv[3]);
            std::vector<int64_t> ids;
            for (int i = 5; i < argc; ++i) {
                ids.push_back(std::stoll(argv[i]));
            }
            m->eval();
            torch::NoGradGuard no_grad;
            st::save(argv[4], {{"logits", m->forward(torch::tensor(ids).view({1, -1}))}});
            return 0;
        }
        if (cmd == "adapter") {
            // NF4 + LoRA (r 4, alpha 8) on q_proj, v_proj and down_proj with lora_B set to seeded random values, the
            // adapter saved in PEFT format to ADAPTER_DIR, and the float32 logits of ID... saved to OUT.
            const qlora::llama::LlamaConfig c = qlora::llama::load_config(argv[2]);
            qlora::llama::LlamaForCausalLM m(c);
            qlora::llama::load_weights(m, st::Checkpoint::open(argv[2]), at::kFloat);
            qlora::llama::LoraSpec spec;
            spec.r = 4;
            spec.lora_alpha = 8.0;
            spec.target_modules = {"q_proj", "v_proj", "down_proj"};
            torch::manual_seed(7);
            qlora::llama::apply_qlora(m, spec);
            {
                torch::NoGradGuard no_grad;
                for (auto& item : m->named_parameters()) {
                    if (item.key().find("lora_B") != std::string::npos) {
                        item.value().normal_(0.0, 0.1);
                    }
                }
            }
            qlora::llama::save_adapter(m, argv[3], argv[2]);
            std::vector<int64_t> ids;
            for (int i = 5; i < argc; ++i) {
                ids.push_back(std::stoll(argv[i]));
            }
            torch::NoGradGuard no_grad;
            st::save(argv[4], {{"logits", m->forward(torch::tensor(ids).view({1, -1}))}});
            return 0;
        }
        if (cmd == "logits" || cmd == "qlogits") {
            // float32 forward on one sequence, logits saved as "logits"; qlogits first turns all seven projections of
            // every layer into NF4 (blocksize 64, double quantization) + LoRA (B = 0, so LoRA adds nothing yet).
            const qlora::llama::LlamaConfig c = qlora::llama::load_config(argv[2]);
            qlora::llama::LlamaForCausalLM m(c);
            qlora::llama::load_weights(m, st::Checkpoint::open(argv[2]), at::kFloat);
            if (cmd == "qlogits") {
                qlora::llama::apply_qlora(m, qlora::llama::LoraSpec{});
            }
            std::vector<int64_t> ids;
            for (int i = 4; i < argc; ++i) {
                ids.push_back(std::stoll(argv[i]));
            }
            torch::NoGradGuard no_grad;
            const at::Tensor logits = m->forward(torch::tensor(ids).view({1, -1}));
            st::save(argv[3], {{"logits", logits}});
            return 0;
        }
        if (cmd == "model") {
            const qlora::llama::LlamaConfig c = qlora::llama::load_config(argv[2]);
            const st::Checkpoint ck = st::Checkpoint::open(argv[2]);
            qlora::llama::check_checkpoint(c, ck);
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
        const st::File f = st::File::open(argv[2]);
        if (cmd == "check") {
            for (const st::TensorInfo& t : f.header().tensors) {
                std::printf("%s %s [", t.name.c_str(), st::dtype_name(t.dtype));
                for (size_t i = 0; i < t.shape.size(); ++i) {
                    std::printf("%s%lld", i ? "," : "", static_cast<long long>(t.shape[i]));
                }
                std::printf("]\n");
            }
            return 0;
        }
        std::vector<std::pair<std::string, at::Tensor>> tensors;
        for (const st::TensorInfo& t : f.header().tensors) {
            tensors.emplace_back(t.name, f.tensor(t.name));
        }
        std::map<std::string, std::string> metadata = f.header().metadata;
        st::save(argv[3], tensors, metadata);
        return 0;
    } catch (const std::runtime_error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
