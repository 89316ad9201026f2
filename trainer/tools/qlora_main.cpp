// trainer/tools/qlora_main.cpp: the `qlora` command line.
//
//   qlora train CONFIG [key=value ...]        fine-tune (qlora/trainer/train.h)
//   qlora validate CONFIG [key=value ...]     check the config, the model directory and every dataset line
//   qlora preprocess CONFIG [key=value ...] [--debug [-n N]]   tokenize and report; --debug prints examples token by
//                                             token with their labels; --dump FILE writes them as JSONL
//   qlora estimate CONFIG [key=value ...]     the run's memory budget, before anything large is allocated
//   qlora merge CONFIG [key=value ...] [--out DIR] | --base DIR --adapter DIR --out DIR [--dtype bf16|fp16|fp32|nf4]
//               [--base-dense DIR] [--dense-base] [--force]
//                                             fold a LoRA adapter into its base: a Hugging Face checkpoint
//   qlora export --format torchscript|safetensors (--model DIR | --base DIR --adapter DIR) --out PATH
//                                             a merged model as a TorchScript archive (stock LibTorch) or safetensors
//   qlora generate --model DIR [--adapter [NAME=]DIR ...] (--prompt TEXT | --alpaca INSTRUCTION [--input TEXT] |
//                  --chat [--system TEXT]) [...]
//                                             generate from a model (and PEFT adapters, switched with /adapter NAME in
//                                             --chat), streaming to stdout, with a key/value cache
//   qlora init CONFIG_JSON OUT_DIR [--seed N] [--nf4] [--dtype fp32|bf16]
//                                             a randomly initialised model (transformers' init) as a Hugging Face
//                                             directory, e.g. to pretrain a small model from scratch; --nf4 streams the
//                                             projections into NF4 (a 7B-shaped model in about 4 GB)
// Overrides use the config's keys, dotted for nested ones (`lora_r=16`, `datasets.0.path=data.jsonl`). Bad input
// gives one line on stderr and exit status 1; an interrupted training run (SIGINT/SIGTERM) saves a checkpoint after
// the current step and exits with status 130.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "qlora/trainer/adapters.h"
#include "qlora/trainer/config.h"
#include "qlora/trainer/data.h"
#include "qlora/trainer/estimate.h"
#include "qlora/trainer/generate.h"
#include "qlora/trainer/llama.h"
#include "qlora/trainer/llama_config.h"
#include "qlora/trainer/merge.h"
#include "qlora/trainer/train.h"

namespace {

std::atomic<bool> g_stop{false};

// A whole number >= 1 (CLI11's PositiveNumber accepts 0.5 and prints its range as 0 to 1.8e308).
const CLI::Validator kPositiveInt(
    [](std::string& v) -> std::string {
        size_t used = 0;
        long long n = 0;
        try {
            n = std::stoll(v, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used != v.size() || v.empty() || n < 1) {
            return "expected a whole number >= 1, got '" + v + "'";
        }
        return "";
    },
    "INT>=1"
);

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

// Streams generated text to stdout: decodes the whole tail each time (sentencepiece merges spaces across pieces) and
// holds back the last few characters while a stop string could still be forming.
class TextStream {
  public:
    TextStream(const qlora::data::Tokenizer& tok, size_t holdback) : tok_(tok), holdback_(holdback) {}
    void on_token(int64_t t) {
        if (t == tok_.eos_id()) {
            return;
        }
        ids_.push_back(static_cast<int32_t>(t));
        const std::string now = tok_.decode(ids_);
        if (now.size() > shown_ + holdback_) {
            std::fwrite(now.data() + shown_, 1, now.size() - holdback_ - shown_, stdout);
            shown_ = now.size() - holdback_;
            std::fflush(stdout);
        }
    }
    // Prints the rest of the final text (generate's result, already cut before a stop string).
    void finish(const std::string& text) {
        if (text.size() > shown_) {
            std::fwrite(text.data() + shown_, 1, text.size() - shown_, stdout);
        }
        std::fflush(stdout);
    }

  private:
    const qlora::data::Tokenizer& tok_;
    size_t holdback_;
    std::vector<int32_t> ids_;
    size_t shown_ = 0;
};

// "NAME=DIR" or "DIR" (named after the directory).
std::pair<std::string, std::string> adapter_arg(const std::string& arg) {
    const size_t eq = arg.find('=');
    if (eq != std::string::npos && eq > 0 && !std::filesystem::exists(arg)) {
        return {arg.substr(0, eq), arg.substr(eq + 1)};
    }
    const std::filesystem::path p = std::filesystem::path(arg).lexically_normal();
    const std::string name = (p.has_filename() ? p.filename() : p.parent_path().filename()).string();
    return {name.empty() ? "adapter" : name, arg};
}

void print_probe(const char* what, const qlora::llama::ProbeResult& r) {
    std::printf(
        "probe: max |logit difference| %.3g over %lld logits (largest |logit| %.3g), %s\n", r.max_abs_diff,
        static_cast<long long>(r.logits), r.max_abs_logit, what
    );
}

// The model the adapter was trained as (NF4 or dense base + LoRA), for the merge's probe.
qlora::llama::LlamaForCausalLM adapter_model(const qlora::llama::MergeOptions& mo, at::ScalarType dtype) {
    qlora::llama::LoadOptions lo;
    lo.dtype = dtype;
    lo.lora = qlora::llama::read_adapter_config(mo.adapter_dir);
    lo.lora->load_in_4bit = !mo.dense_base;
    qlora::llama::LlamaForCausalLM m = qlora::llama::load_model(mo.base_dir, lo);
    qlora::llama::load_adapter(m, mo.adapter_dir);
    return m;
}
} // namespace

int main(int argc, char** argv) {
    CLI::App app{"qlora: QLoRA fine-tuning of Llama models (LibTorch, on the CPU)"};
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
    std::string profile_dir;
    int64_t profile_steps = 2;
    train->add_option(
        "--profile", profile_dir,
        "Profile steps with PyTorch's profiler: DIR/trace.json (Chrome trace) and DIR/ops.json (self time per op)"
    );
    train->add_option("--profile-steps", profile_steps, "How many steps to profile, from the second")
        ->check(kPositiveInt);
    CLI::App* gen = app.add_subcommand("generate", "Generate text from a model, optionally with a LoRA adapter");
    std::string g_model, g_tokenizer, g_prompt, g_alpaca, g_input;
    qlora::llama::GenerateOptions g_opt;
    g_opt.max_new_tokens = 64;
    bool g_bf16 = false;
    gen->add_option("--model", g_model, "Hugging Face model directory")->required()->check(CLI::ExistingDirectory);
    std::vector<std::string> g_adapters, g_stops;
    std::string g_system;
    bool g_chat = false, g_no_cache = false;
    gen->add_option(
        "--adapter", g_adapters,
        "PEFT adapter directory, optionally NAME=DIR; repeat for several over one NF4 base (the first is active; "
        "/adapter NAME switches in --chat)"
    );
    gen->add_flag("--chat", g_chat, "Interactive Llama 2 chat on stdin (/adapter NAME|none, /reset, /quit)");
    gen->add_option("--system", g_system, "System prompt (with --chat)");
    gen->add_option("--stop", g_stops, "Stop when the generated text contains this string (repeatable)");
    gen->add_flag("--no-kv-cache", g_no_cache, "Recompute the whole sequence every step (slow; for comparison)");
    gen->add_option("--tokenizer", g_tokenizer, "sentencepiece model (default: MODEL/tokenizer.model)");
    gen->add_option("--prompt", g_prompt, "Raw prompt text (BOS is prepended)");
    gen->add_option("--alpaca", g_alpaca, "An instruction, formatted with the Alpaca prompt template");
    gen->add_option("--input", g_input, "The Alpaca input field (with --alpaca)");
    gen->add_option("--max-new-tokens", g_opt.max_new_tokens, "Stop after this many new tokens")->check(kPositiveInt);
    gen->add_option("--temperature", g_opt.temperature, "0 = greedy");
    gen->add_option("--top-k", g_opt.top_k, "Sample from the k most likely tokens (0 = all)");
    gen->add_option("--top-p", g_opt.top_p, "Nucleus sampling mass");
    gen->add_option("--seed", g_opt.seed, "Sampling seed");
    gen->add_flag("--bf16", g_bf16, "Compute in bfloat16");
    CLI::App* merge =
        app.add_subcommand("merge", "Fold a LoRA adapter into its base model (a Hugging Face checkpoint)");
    std::string m_config, m_base, m_adapter, m_out, m_dense, m_dtype;
    std::vector<std::string> m_overrides;
    bool m_force = false, m_dense_base = false;
    merge->add_option("config", m_config, "YAML training config (base_model, output_dir, adapter)")
        ->check(CLI::ExistingFile);
    merge->add_option("overrides", m_overrides, "key=value overrides of config keys");
    merge->add_option("--base", m_base, "Base model directory the adapter was trained on")
        ->check(CLI::ExistingDirectory);
    merge->add_option("--adapter", m_adapter, "PEFT adapter directory")->check(CLI::ExistingDirectory);
    merge->add_option("--out", m_out, "Output directory (must not exist; default with CONFIG: OUTPUT_DIR/merged)");
    merge->add_option("--dtype", m_dtype, "bf16, fp16, fp32 (default: the base's torch_dtype), or nf4 (with --force)");
    merge->add_option("--base-dense", m_dense, "Merge into this dense checkpoint instead of the dequantized NF4 base")
        ->check(CLI::ExistingDirectory);
    merge->add_flag("--dense-base", m_dense_base, "The adapter was trained on dense weights (adapter: lora)");
    merge->add_flag("--force", m_force, "Allow merging back into 4-bit (--dtype nf4)");
    CLI::App* exp = app.add_subcommand("export", "Export a merged model as TorchScript or safetensors");
    std::string x_format = "torchscript", x_model, x_base, x_adapter, x_dense, x_out, x_dtype = "fp32";
    exp->add_option("--format", x_format, "torchscript or safetensors");
    exp->add_option("--model", x_model, "A dense (merged) model directory")->check(CLI::ExistingDirectory);
    exp->add_option("--base", x_base, "Base model directory (with --adapter: merged in memory first)")
        ->check(CLI::ExistingDirectory);
    exp->add_option("--adapter", x_adapter, "PEFT adapter directory")->check(CLI::ExistingDirectory);
    exp->add_option("--base-dense", x_dense, "Merge into this dense checkpoint instead")->check(CLI::ExistingDirectory);
    exp->add_option("--out", x_out, "Output file (torchscript) or directory (safetensors)")->required();
    exp->add_option("--dtype", x_dtype, "fp32 or bf16: the exported model's dtype");
    CLI::App* init = app.add_subcommand("init", "Write a randomly initialised model for a Llama config.json");
    std::string init_config, init_out;
    uint64_t init_seed = 0;
    init->add_option("config_json", init_config, "Llama config.json")->required()->check(CLI::ExistingFile);
    init->add_option("out_dir", init_out, "Output directory (config.json + model.safetensors)")->required();
    init->add_option("--seed", init_seed, "Random seed");
    bool init_nf4 = false;
    std::string init_dtype = "fp32";
    init->add_flag(
        "--nf4", init_nf4,
        "Store the seven projections 4-bit (bitsandbytes NF4, double quantization), drawn and quantized one tensor at "
        "a time: a 7B-shaped model without ever holding it dense"
    );
    init->add_option("--dtype", init_dtype, "fp32 or bf16: the dtype of the dense tensors");
    std::string dump;
    pre->add_option("--dump", dump, "Write every tokenized example as JSONL (input_ids, labels) to this file");
    pre->add_flag("--debug", debug, "Print examples token by token with their labels (masked tokens marked)");
    pre->add_option("-n,--examples", show, "How many examples per dataset --debug prints")->check(kPositiveInt);
    CLI11_PARSE(app, argc, argv);

    try {
        if (*gen) {
            if (static_cast<int>(!g_prompt.empty()) + static_cast<int>(!g_alpaca.empty()) + static_cast<int>(g_chat) !=
                1) {
                throw std::runtime_error("generate: give exactly one of --prompt, --alpaca and --chat");
            }
            const qlora::data::Tokenizer tok = qlora::data::Tokenizer::load(
                g_tokenizer.empty() ? (std::filesystem::path(g_model) / "tokenizer.model").string() : g_tokenizer
            );
            std::vector<std::pair<std::string, std::string>> named;
            std::vector<std::string> dirs;
            for (const std::string& a : g_adapters) {
                named.push_back(adapter_arg(a));
                dirs.push_back(named.back().second);
            }
            qlora::llama::LoadOptions lo;
            lo.dtype = g_bf16 ? at::kBFloat16 : at::kFloat;
            if (!dirs.empty()) { // one NF4 base for every adapter: the union of their targets quantized
                lo.lora = qlora::llama::LoraSpec{};
                lo.lora->target_modules = qlora::llama::adapter_targets(dirs);
                lo.add_lora = false;
            }
            qlora::llama::AdapterSet set(qlora::llama::load_model(g_model, lo));
            for (const auto& [name, dir] : named) {
                set.add(name, dir);
            }
            if (!named.empty()) {
                set.activate(named.front().first);
            }
            g_opt.stop_ids = {tok.eos_id()};
            g_opt.stop_strings = g_stops;
            g_opt.use_kv_cache = !g_no_cache;
            g_opt.decode = [&](const std::vector<int64_t>& ids) {
                return tok.decode(std::vector<int32_t>(ids.begin(), ids.end()));
            };
            size_t holdback = 0;
            for (const std::string& st : g_stops) {
                holdback = std::max(holdback, st.size());
            }
            const auto run = [&](const std::vector<int64_t>& ids) {
                TextStream stream(tok, holdback);
                const qlora::llama::GenerateResult r =
                    qlora::llama::generate_text(set.model(), ids, g_opt, [&](int64_t t) { stream.on_token(t); });
                stream.finish(r.text);
                if (r.stop == qlora::llama::GenerateResult::Stop::kStopId) {
                    std::printf(" [EOS]");
                }
                std::printf("\n");
                std::fflush(stdout);
                return r.text;
            };
            if (!g_chat) {
                const std::string text = g_alpaca.empty() ? g_prompt : qlora::data::alpaca_prompt(g_alpaca, g_input);
                std::vector<int64_t> ids = {tok.bos_id()};
                for (const int32_t t : tok.encode(text)) {
                    ids.push_back(t);
                }
                run(ids);
                return 0;
            }
            std::vector<std::pair<std::string, std::string>> history;
            const bool tty = ::isatty(STDIN_FILENO) != 0;
            std::printf("chat: adapter %s (loaded: none", set.active().c_str());
            for (const std::string& n : set.names()) {
                std::printf(", %s", n.c_str());
            }
            std::printf("); /adapter NAME switches, /reset forgets the conversation, /quit ends\n");
            std::string line;
            while (true) {
                if (tty) {
                    std::printf("> ");
                    std::fflush(stdout);
                }
                if (!std::getline(std::cin, line) || line == "/quit" || line == "/exit") {
                    break;
                }
                if (line.empty()) {
                    continue;
                }
                if (line.rfind("/adapter", 0) == 0) {
                    const std::string name = line.size() > 9 ? line.substr(9) : "";
                    try {
                        set.activate(name.empty() ? "none" : name);
                        std::printf("[adapter: %s]\n", set.active().c_str());
                    } catch (const std::exception& e) {
                        std::printf("[%s]\n", e.what());
                    }
                    continue;
                }
                if (line == "/reset") {
                    history.clear();
                    std::printf("[conversation cleared]\n");
                    continue;
                }
                const std::vector<int64_t> ids = qlora::data::chat_prompt_ids(tok, g_system, history, line);
                history.emplace_back(line, run(ids));
            }
            return 0;
        }
        if (*merge) {
            qlora::llama::MergeOptions mo;
            mo.dtype = m_dtype;
            mo.force = m_force;
            mo.dense_dir = m_dense;
            mo.dense_base = m_dense_base;
            if (!m_config.empty()) {
                if (!m_base.empty() || !m_adapter.empty()) {
                    throw std::runtime_error("merge: give either CONFIG or --base and --adapter, not both");
                }
                const qlora::config::TrainConfig c = qlora::config::load(m_config, m_overrides);
                mo.base_dir = c.base_model;
                mo.adapter_dir = c.output_dir;
                mo.dense_base = c.adapter == "lora";
                mo.tokenizer = c.tokenizer;
                if (m_out.empty()) {
                    m_out = (std::filesystem::path(c.output_dir) / "merged").string();
                }
            } else {
                if (m_base.empty() || m_adapter.empty() || m_out.empty()) {
                    throw std::runtime_error("merge: give CONFIG, or --base, --adapter and --out");
                }
                mo.base_dir = m_base;
                mo.adapter_dir = m_adapter;
            }
            const qlora::llama::MergedModel merged = qlora::llama::merge_tensors(mo);
            const double nf4_rms = qlora::llama::write_merged(merged, mo, m_out);
            std::printf(
                "merged %zu projections of %s into %s (%s)\n", merged.merged_modules.size(), mo.adapter_dir.c_str(),
                m_out.c_str(), merged.dtype.c_str()
            );
            if (merged.dtype == "nf4") {
                std::printf(
                    "rounding cost of 4-bit: relative RMS error %.4g of the merged weights (NF4 re-quantization)\n",
                    nf4_rms
                );
            }
            const at::ScalarType probe_dtype =
                merged.dtype == "float32" || merged.dtype == "nf4" ? at::kFloat : at::kBFloat16;
            qlora::llama::LlamaForCausalLM reference = adapter_model(mo, probe_dtype);
            qlora::llama::LoadOptions lo;
            lo.dtype = probe_dtype;
            qlora::llama::LlamaForCausalLM reloaded = qlora::llama::load_model(m_out, lo);
            print_probe(
                mo.dense_dir.empty() ? "merged model vs the adapter model it was trained as"
                                     : "merged into the dense base vs the NF4 adapter model (includes NF4 rounding)",
                qlora::llama::probe_logits(reference, reloaded)
            );
            return 0;
        }
        if (*exp) {
            const at::ScalarType dtype = x_dtype == "bf16" ? at::kBFloat16 : at::kFloat;
            if (x_dtype != "bf16" && x_dtype != "fp32") {
                throw std::runtime_error("export: --dtype must be fp32 or bf16, got '" + x_dtype + "'");
            }
            const std::unique_ptr<qlora::llama::Exporter> exporter = qlora::llama::make_exporter(x_format);
            qlora::llama::LlamaForCausalLM m{nullptr};
            if (!x_model.empty()) {
                if (!x_base.empty() || !x_adapter.empty()) {
                    throw std::runtime_error("export: give either --model or --base and --adapter, not both");
                }
                qlora::llama::LoadOptions lo;
                lo.dtype = dtype;
                m = qlora::llama::load_model(x_model, lo);
            } else {
                if (x_base.empty() || x_adapter.empty()) {
                    throw std::runtime_error("export: give --model, or --base and --adapter");
                }
                qlora::llama::MergeOptions mo;
                mo.base_dir = x_base;
                mo.adapter_dir = x_adapter;
                mo.dense_dir = x_dense;
                mo.dtype = "float32";
                m = qlora::llama::merged_model(qlora::llama::merge_tensors(mo), dtype);
            }
            exporter->write(m, x_out);
            std::printf("wrote %s (%s)\n", x_out.c_str(), exporter->format().c_str());
            return 0;
        }
        if (*init) {
            const qlora::llama::LlamaConfig mc = qlora::llama::load_config(init_config);
            if (init_dtype != "fp32" && init_dtype != "bf16") {
                throw std::runtime_error("init: --dtype must be fp32 or bf16, got '" + init_dtype + "'");
            }
            if (init_nf4 || init_dtype == "bf16") {
                const qlora::llama::LoraSpec spec;
                qlora::llama::save_random_model(
                    mc, init_out, init_seed, init_dtype == "bf16" ? at::kBFloat16 : at::kFloat,
                    init_nf4 ? &spec : nullptr
                );
            } else { // transformers' init order, as before (the bundled model was made this way)
                torch::manual_seed(init_seed);
                const qlora::llama::LlamaForCausalLM m(mc);
                qlora::llama::save_model(m, init_out);
            }
            std::printf("wrote %s\n", init_out.c_str());
            return 0;
        }
        const qlora::config::TrainConfig c = qlora::config::load(config_path, overrides);
        if (*train) {
            if (!profile_dir.empty()) { // before the model loads: a bad directory is found at once
                std::error_code ec;
                std::filesystem::create_directories(profile_dir, ec);
                if (ec) {
                    std::fprintf(
                        stderr, "qlora: --profile %s: cannot create the directory (%s)\n", profile_dir.c_str(),
                        ec.message().c_str()
                    );
                    return 1;
                }
            }
            std::signal(SIGINT, on_signal);
            std::signal(SIGTERM, on_signal);
            qlora::train::RunOptions opt;
            opt.progress_bar = ::isatty(STDERR_FILENO) != 0;
            opt.stop = &g_stop;
            opt.profile_dir = profile_dir;
            opt.profile_steps = profile_steps;
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
