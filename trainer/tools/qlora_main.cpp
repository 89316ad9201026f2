// trainer/tools/qlora_main.cpp: the `qlora` command line.
//
//   qlora train CONFIG [key=value ...]        fine-tune (qlora/trainer/train.h)
//   qlora validate CONFIG [key=value ...]     check the config, the model directory and every dataset line
//   qlora preprocess CONFIG [key=value ...] [--debug [-n N]]   tokenize and report; --debug prints examples token by
//                                             token with their labels; --dump FILE writes them as JSONL
//   qlora init CONFIG_JSON OUT_DIR [--seed N] a randomly initialised model (transformers' init) as a Hugging Face
//                                             directory, e.g. to pretrain a small model from scratch
// Overrides use the config's keys, dotted for nested ones (`lora_r=16`, `datasets.0.path=data.jsonl`). Bad input
// gives one line on stderr and exit status 1; an interrupted training run (SIGINT/SIGTERM) saves a checkpoint after
// the current step and exits with status 130.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "qlora/trainer/config.h"
#include "qlora/trainer/data.h"
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
    for (CLI::App* sub : {train, validate, pre}) {
        sub->add_option("config", config_path, "YAML config file")->required()->check(CLI::ExistingFile);
        sub->add_option("overrides", overrides, "key=value overrides of config keys (dotted for nested keys)");
    }
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
        preprocess(c, debug, show, dump);
        return 0;
    } catch (const c10::Error& e) {
        std::fprintf(stderr, "qlora: %s\n", e.what_without_backtrace());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "qlora: %s\n", e.what());
    }
    return 1;
}
