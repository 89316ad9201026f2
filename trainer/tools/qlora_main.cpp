// trainer/tools/qlora_main.cpp: the `qlora` command line.
//
//   qlora train CONFIG [key=value ...]        fine-tune (qlora/trainer/train.h)
//   qlora validate CONFIG [key=value ...]     check the config, the model directory and every dataset line
//   qlora preprocess CONFIG [key=value ...] [--debug [-n N]]   tokenize and report; --debug prints examples token by
//                                             token with their labels; --dump FILE writes them as JSONL
//   qlora estimate CONFIG [key=value ...]     the run's memory budget, before anything large is allocated
//   qlora generate --model DIR [--adapter DIR] (--prompt TEXT | --alpaca INSTRUCTION [--input TEXT]) [...]
//                                             generate from a model (and a PEFT adapter), streaming to stdout
//   qlora init CONFIG_JSON OUT_DIR [--seed N] a randomly initialised model (transformers' init) as a Hugging Face
//                                             directory, e.g. to pretrain a small model from scratch
// Overrides use the config's keys, dotted for nested ones (`lora_r=16`, `datasets.0.path=data.jsonl`). Bad input
// gives one line on stderr and exit status 1; an interrupted training run (SIGINT/SIGTERM) saves a checkpoint after
// the current step and exits with status 130.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "qlora/trainer/config.h"
#include "qlora/trainer/data.h"
#include "qlora/trainer/estimate.h"
#include "qlora/trainer/generate.h"
#include "qlora/trainer/llama.h"
#include "qlora/trainer/llama_config.h"
#include "qlora/trainer/train.h"

namespace {

std::atomic<bool> g_stop{false};

void on_signal(int) {
    g_stop.store(true);
    // A second signal ends the process at once (the default action).
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
}

// Tokenizes every dataset (each bad line stops here) and prints the statistics; returns the examples of the first.
void preprocess(const qlora::config::TrainConfig& c, bool debug, int64_t show, const std::string& dump = "") {
    std::FILE* out = nullptr;
    if (!dump.empty() && (out = std::fopen(dump.c_str(), "w")) == nullptr) {
        throw std::runtime_error(dump + ": cannot open for writing");
    }
    const qlora::data::Tokenizer tok = qlora::data::Tokenizer::load(c.tokenizer);
    qlora::data::FormatOptions fo;
    fo.sequence_len = c.sequence_len;
    fo.train_on_inputs = c.train_on_inputs;
    for (const auto& d : c.datasets) {
        qlora::data::DatasetStats st{};
        const auto ex = qlora::data::load_jsonl(d.path, qlora::data::parse_format(d.type), tok, fo, &st);
        std::printf(
            "%s (%s): %lld lines, %lld examples, %lld tokens (%lld trained), %lld truncated to %lld tokens, %lld "
            "dropped with no target left, %.1f%% end in a trained EOS\n",
            d.path.c_str(), d.type.c_str(), static_cast<long long>(st.lines), static_cast<long long>(st.examples),
            static_cast<long long>(st.tokens), static_cast<long long>(st.trained_tokens),
            static_cast<long long>(st.truncated), static_cast<long long>(c.sequence_len),
            static_cast<long long>(st.no_target),
            st.examples > 0 ? 100.0 * static_cast<double>(st.ending_in_eos) / static_cast<double>(st.examples) : 0.0
        );
        for (size_t i = 0; out != nullptr && i < ex.size(); ++i) {
            const std::string line =
                nlohmann::json{{"input_ids", ex[i].input_ids}, {"labels", ex[i].labels}}.dump() + "\n";
            std::fwrite(line.data(), 1, line.size(), out);
        }
        if (debug) {
            for (size_t i = 0; i < ex.size() && static_cast<int64_t>(i) < show; ++i) {
                std::printf(
                    "--- example %zu of %s\n%s\n", i, d.path.c_str(), qlora::data::render_debug(ex[i], tok).c_str()
                );
            }
        }
    }
    if (out != nullptr) {
        std::fclose(out);
    }
}

} // namespace

int main(int argc, char** argv) {
    CLI::App app{"qlora: QLoRA fine-tuning of Llama models (LibTorch, CPU and CUDA)"};
    app.require_subcommand(1);
    std::string config_path;
    std::vector<std::string> overrides;
    bool debug = false;
    int64_t show = 3;

    CLI::App* train = app.add_subcommand("train", "Fine-tune according to a YAML config (axolotl's key names)");
    CLI::App* validate =
        app.add_subcommand("validate", "Check a config, its model directory and every dataset line, then exit");
    CLI::App* pre = app.add_subcommand("preprocess", "Tokenize the datasets and report; --debug prints examples");
    CLI::App* est = app.add_subcommand("estimate", "Print the memory budget of a training run");
    for (CLI::App* sub : {train, validate, pre, est}) {
        sub->add_option("config", config_path, "YAML config file")->required()->check(CLI::ExistingFile);
        sub->add_option("overrides", overrides, "key=value overrides of config keys (dotted for nested keys)");
    }
    CLI::App* gen = app.add_subcommand("generate", "Generate text from a model, optionally with a LoRA adapter");
    std::string g_model, g_adapter, g_tokenizer, g_prompt, g_alpaca, g_input;
    qlora::llama::GenerateOptions g_opt;
    g_opt.max_new_tokens = 64;
    bool g_bf16 = false;
    gen->add_option("--model", g_model, "Hugging Face model directory")->required()->check(CLI::ExistingDirectory);
    gen->add_option("--adapter", g_adapter, "PEFT adapter directory (its targets become NF4 + LoRA)");
    gen->add_option("--tokenizer", g_tokenizer, "sentencepiece model (default: MODEL/tokenizer.model)");
    gen->add_option("--prompt", g_prompt, "Raw prompt text (BOS is prepended)");
    gen->add_option("--alpaca", g_alpaca, "An instruction, formatted with the Alpaca prompt template");
    gen->add_option("--input", g_input, "The Alpaca input field (with --alpaca)");
    gen->add_option("--max-new-tokens", g_opt.max_new_tokens, "Stop after this many new tokens")
        ->check(CLI::PositiveNumber);
    gen->add_option("--temperature", g_opt.temperature, "0 = greedy");
    gen->add_option("--top-k", g_opt.top_k, "Sample from the k most likely tokens (0 = all)");
    gen->add_option("--top-p", g_opt.top_p, "Nucleus sampling mass");
    gen->add_option("--seed", g_opt.seed, "Sampling seed");
    gen->add_flag("--bf16", g_bf16, "Compute in bfloat16");
    CLI::App* init = app.add_subcommand("init", "Write a randomly initialised model for a Llama config.json");
    std::string init_config, init_out;
    uint64_t init_seed = 0;
    init->add_option("config_json", init_config, "Llama config.json")->required()->check(CLI::ExistingFile);
    init->add_option("out_dir", init_out, "Output directory (config.json + model.safetensors)")->required();
    init->add_option("--seed", init_seed, "Random seed");
    std::string dump;
    pre->add_option("--dump", dump, "Write every tokenized example as JSONL (input_ids, labels) to this file");
    pre->add_flag("--debug", debug, "Print examples token by token with their labels (masked tokens marked)");
    pre->add_option("-n,--examples", show, "How many examples per dataset --debug prints")->check(CLI::PositiveNumber);
    CLI11_PARSE(app, argc, argv);

    try {
        if (*gen) {
            if (g_prompt.empty() == g_alpaca.empty()) {
                throw std::runtime_error("generate: give exactly one of --prompt and --alpaca");
            }
            const qlora::data::Tokenizer tok = qlora::data::Tokenizer::load(
                g_tokenizer.empty() ? (std::filesystem::path(g_model) / "tokenizer.model").string() : g_tokenizer
            );
            qlora::llama::LoadOptions lo;
            lo.dtype = g_bf16 ? at::kBFloat16 : at::kFloat;
            qlora::llama::LlamaForCausalLM m = qlora::llama::load_model(g_model, lo);
            if (!g_adapter.empty()) {
                qlora::llama::load_adapter(m, g_adapter);
            }
            const std::string text = g_alpaca.empty() ? g_prompt : qlora::data::alpaca_prompt(g_alpaca, g_input);
            std::vector<int64_t> ids = {tok.bos_id()};
            for (const int32_t t : tok.encode(text)) {
                ids.push_back(t);
            }
            g_opt.stop_ids = {tok.eos_id()};
            std::vector<int32_t> out;
            std::string shown;
            qlora::llama::generate(m, ids, g_opt, [&](int64_t t) {
                if (t == tok.eos_id()) {
                    std::printf(" [EOS]");
                } else {
                    out.push_back(static_cast<int32_t>(t));
                    const std::string now = tok.decode(out); // decode the whole tail: pieces merge spaces
                    std::printf("%s", now.substr(std::min(shown.size(), now.size())).c_str());
                    shown = now;
                }
                std::fflush(stdout);
            });
            std::printf("\n");
            return 0;
        }
        if (*init) {
            const qlora::llama::LlamaConfig mc = qlora::llama::load_config(init_config);
            torch::manual_seed(init_seed);
            const qlora::llama::LlamaForCausalLM m(mc);
            qlora::llama::save_model(m, init_out);
            std::printf("wrote %s\n", init_out.c_str());
            return 0;
        }
        const qlora::config::TrainConfig c = qlora::config::load(config_path, overrides);
        if (*train) {
            std::signal(SIGINT, on_signal);
            std::signal(SIGTERM, on_signal);
            qlora::train::RunOptions opt;
            opt.progress_bar = ::isatty(STDERR_FILENO) != 0;
            opt.stop = &g_stop;
            const qlora::train::RunResult r = qlora::train::run(c, opt);
            return r.interrupted ? 130 : 0;
        }
        if (*validate) {
            const qlora::llama::LlamaConfig mc = qlora::llama::load_config(c.base_model);
            qlora::llama::check_checkpoint(mc, qlora::safetensors::Checkpoint::open(c.base_model));
            preprocess(c, false, 0);
            std::printf("%s: OK\n", config_path.c_str());
            return 0;
        }
        if (*est) {
            const qlora::train::MemoryEstimate e = qlora::train::estimate_memory(c);
            for (const auto& [name, bytes] : e.parts) {
                std::printf("%10.1f MiB  %s\n", static_cast<double>(bytes) / (1 << 20), name.c_str());
            }
            std::printf(
                "%10.1f MiB  total (estimated peak resident memory)\n", static_cast<double>(e.total) / (1 << 20)
            );
            return 0;
        }
        preprocess(c, debug, show, dump);
        return 0;
    } catch (const c10::Error& e) {
        std::fprintf(stderr, "qlora: %s\n", e.what_without_backtrace());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "qlora: %s\n", e.what());
    }
    return 1;
}
