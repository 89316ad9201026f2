// trainer/src/train.cpp: see qlora/trainer/train.h.
//
// Note [Training loop]
//
// Data. The training examples are shuffled once per epoch by a permutation seeded from (seed, epoch) with this
// file's own generator (std::mt19937_64, whose output the standard fixes, and a plain Fisher-Yates), then cut into
// rows: one example per row, or greedily packed rows of sequence_len (qlora/trainer/data.h). The data position is
// (epoch, row); a micro-batch is the next micro_batch_size rows of the epoch (the last one of an epoch may be
// shorter), and an optimizer step takes gradient_accumulation_steps micro-batches, crossing epochs when needed.
// Without max_steps the run has floor(num_epochs x micro-batches of epoch 0 / accumulation) steps (at least one).
//
// Loss. Hugging Face's causal-LM loss: logits in float32, shifted by one; with packing, a target in the next segment
// is masked too. Each step's loss is the sum of token losses over all its micro-batches divided by the number of
// trained tokens of the whole step (transformers' num_items_in_batch), so accumulation does not change the
// gradient's scale with the micro-batch size.
//
// Resume. Checkpoints are written after an optimizer step only (so the accumulation position is always 0), as a
// directory created atomically (qlora/trainer/atomic_file.h): the adapter (or the full model for adapter: none), the
// optimizer state, the CPU generator state, and trainer_state.json (step, data position, tokens seen, the config's
// run-affecting keys and fingerprint). Restoring all of it continues the run bit for bit on the CPU with the same
// thread count: every random draw after the checkpoint comes from the restored generator, the data order from
// (seed, epoch), and the 8-bit optimizer state is restored exactly.
#include "qlora/trainer/train.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <nlohmann/json.hpp>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include "qlora/optim.h"
#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/data.h"
#include "qlora/trainer/json.h"
#include "qlora/trainer/llama.h"
#include "qlora/trainer/memory.h"
#include "qlora/trainer/profile.h"
#include "qlora/trainer/safetensors.h"

namespace qlora::train {
namespace {

namespace fs = std::filesystem;
using config::TrainConfig;

[[noreturn]] void fail(const std::string& msg) {
    throw std::runtime_error(msg);
}

// A permutation of 0..n-1 fixed by `seed` on every platform.
std::vector<int64_t> permutation(int64_t n, uint64_t seed, bool shuffle = true) {
    std::vector<int64_t> p(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        p[static_cast<size_t>(i)] = i;
    }
    if (!shuffle) {
        return p;
    }
    std::mt19937_64 gen(seed);
    for (int64_t i = n - 1; i > 0; --i) {
        const auto j = static_cast<int64_t>(gen() % static_cast<uint64_t>(i + 1));
        std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
    }
    return p;
}

uint64_t mix(uint64_t seed, uint64_t salt) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (salt + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

std::string hms(double seconds) {
    const auto s = static_cast<int64_t>(std::max(0.0, seconds));
    char buf[32];
    if (s >= 3600) {
        std::snprintf(
            buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
            static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60)
        );
    } else {
        std::snprintf(buf, sizeof(buf), "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
    }
    return buf;
}

std::string with_commas(int64_t v) {
    std::string s = std::to_string(v), out;
    for (size_t i = 0; i < s.size(); ++i) {
        if (i > 0 && (s.size() - i) % 3 == 0) {
            out += ',';
        }
        out += s[i];
    }
    return out;
}

// --------------------------------------------------------------------------------------------------------------
// Data

// The rows of each epoch, built when first needed.
class Rows {
  public:
    Rows(const std::vector<data::Example>& ex, bool packing, int64_t seq_len, uint64_t seed, bool shuffle)
        : ex_(ex), packing_(packing), shuffle_(shuffle), seq_len_(seq_len), seed_(seed) {}

    const std::vector<std::vector<int64_t>>& of(int64_t epoch) {
        if (epoch != epoch_) {
            const auto n = static_cast<int64_t>(ex_.size());
            const std::vector<int64_t> order =
                shuffle_ ? permutation(n, mix(seed_, static_cast<uint64_t>(epoch))) : permutation(n, 0, false);
            rows_ = packing_ ? data::pack(ex_, order, seq_len_) : data::unpacked(order);
            epoch_ = epoch;
        }
        return rows_;
    }

  private:
    const std::vector<data::Example>& ex_;
    bool packing_, shuffle_;
    int64_t seq_len_;
    uint64_t seed_;
    int64_t epoch_ = -1;
    std::vector<std::vector<int64_t>> rows_;
};

struct Position {
    int64_t epoch = 0, row = 0;
};

data::Batch make_batch(
    const std::vector<data::Example>& ex, const std::vector<std::vector<int64_t>>& rows, bool packing, int64_t seq_len,
    int32_t pad_id
) {
    int64_t T = 1;
    for (const auto& row : rows) {
        int64_t len = 0;
        for (const int64_t i : row) {
            len += static_cast<int64_t>(ex[static_cast<size_t>(i)].input_ids.size());
        }
        T = std::max(T, len);
    }
    return data::collate(ex, rows, packing ? seq_len : T, pad_id);
}

// Shifted targets: labels[:, 1:] with targets across a segment boundary masked.
at::Tensor shifted_targets(const data::Batch& b) {
    const int64_t T = b.input_ids.size(1);
    const at::Tensor labels = b.labels.narrow(1, 1, T - 1);
    const at::Tensor same = b.segment_ids.narrow(1, 1, T - 1) == b.segment_ids.narrow(1, 0, T - 1);
    return at::where(same, labels, at::full_like(labels, -100));
}

// Sum of the token losses of a batch (float32), and the number of targets it covers.
std::pair<at::Tensor, int64_t> loss_sum(llama::LlamaForCausalLM& m, const data::Batch& b) {
    const at::Tensor targets = shifted_targets(b);
    const int64_t n = targets.ne(-100).sum().item<int64_t>();
    const int64_t T = b.input_ids.size(1);
    const at::Tensor logits = m->forward(b.input_ids, b.position_ids, b.segment_ids).to(at::kFloat);
    const int64_t V = logits.size(-1);
    const at::Tensor loss = at::cross_entropy_loss(
        logits.narrow(1, 0, T - 1).reshape({-1, V}), targets.reshape({-1}), {}, at::Reduction::Sum, -100
    );
    return {loss, n};
}

// --------------------------------------------------------------------------------------------------------------
// Optimizer

struct Optimizer {
    std::unique_ptr<torch::optim::Optimizer> opt;
    bool torch_adamw = false;

    void set_lr(double lr) {
        for (auto& g : opt->param_groups()) {
            g.options().set_lr(lr);
        }
    }

    std::vector<std::pair<std::string, at::Tensor>> state() const {
        std::vector<std::pair<std::string, at::Tensor>> out;
        if (!torch_adamw) {
            for (auto& [k, v] : static_cast<const qlora::optim::AdamW8bit&>(*opt).state_tensors()) {
                out.emplace_back(k, v);
            }
            return out;
        }
        int64_t i = 0;
        for (const auto& g : opt->param_groups()) {
            for (const at::Tensor& p : g.params()) {
                const auto it = opt->state().find(p.unsafeGetTensorImpl());
                if (it != opt->state().end()) {
                    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
                    const std::string k = "state." + std::to_string(i) + ".";
                    out.emplace_back(k + "step", at::scalar_tensor(s.step(), at::kLong));
                    out.emplace_back(k + "exp_avg", s.exp_avg().contiguous());
                    out.emplace_back(k + "exp_avg_sq", s.exp_avg_sq().contiguous());
                }
                ++i;
            }
        }
        return out;
    }

    void load(const std::map<std::string, at::Tensor>& t, const std::string& what) {
        if (!torch_adamw) {
            static_cast<qlora::optim::AdamW8bit&>(*opt).load_state_tensors(t);
            return;
        }
        int64_t i = 0;
        for (auto& g : opt->param_groups()) {
            for (const at::Tensor& p : g.params()) {
                const std::string k = "state." + std::to_string(i++) + ".";
                if (t.count(k + "step") == 0) {
                    continue;
                }
                for (const char* f : {"exp_avg", "exp_avg_sq"}) {
                    if (t.count(k + f) == 0 || t.at(k + f).sizes() != p.sizes()) {
                        fail(what + ": optimizer state " + k + f + " is missing or has the wrong shape");
                    }
                }
                auto s = std::make_unique<torch::optim::AdamWParamState>();
                s->step(t.at(k + "step").item<int64_t>());
                s->exp_avg(t.at(k + "exp_avg").clone());
                s->exp_avg_sq(t.at(k + "exp_avg_sq").clone());
                opt->state()[p.unsafeGetTensorImpl()] = std::move(s);
            }
        }
    }
};

Optimizer make_optimizer(const TrainConfig& c, const std::vector<at::Tensor>& params) {
    Optimizer o;
    const auto betas = std::make_tuple(c.adam_beta1, c.adam_beta2);
    if (c.optimizer == "adamw_torch") {
        o.torch_adamw = true;
        o.opt = std::make_unique<torch::optim::AdamW>(
            params,
            torch::optim::AdamWOptions(c.learning_rate).betas(betas).eps(c.adam_epsilon).weight_decay(c.weight_decay)
        );
        return o;
    }
    const auto options =
        qlora::optim::AdamW8bitOptions(c.learning_rate).betas(betas).eps(c.adam_epsilon).weight_decay(c.weight_decay);
    if (c.optimizer == "paged_adamw_8bit") {
        o.opt = std::make_unique<qlora::optim::PagedAdamW8bit>(params, options);
    } else if (c.optimizer == "adamw_8bit") {
        o.opt = std::make_unique<qlora::optim::AdamW8bit>(params, options);
    } else if (c.optimizer == "paged_adamw_32bit") {
        o.opt = std::make_unique<qlora::optim::PagedAdamW32bit>(params, options);
    } else {
        fail("optimizer '" + c.optimizer + "' is not supported");
    }
    return o;
}

// --------------------------------------------------------------------------------------------------------------
// Checkpoints

struct State {
    int64_t step = 0; // optimizer steps done
    Position pos;
    int64_t tokens_seen = 0, trained_tokens_seen = 0;
};

std::map<std::string, std::string> run_affecting_map(const TrainConfig& c) {
    std::map<std::string, std::string> out;
    for (const auto& [k, v] : config::run_affecting(c)) {
        out[k] = v;
    }
    return out;
}

std::vector<std::pair<int64_t, fs::path>> checkpoints_in(const fs::path& dir) {
    std::vector<std::pair<int64_t, fs::path>> out;
    if (!fs::is_directory(dir)) {
        return out;
    }
    static const std::regex kName(R"(checkpoint-(\d+))");
    for (const auto& e : fs::directory_iterator(dir)) {
        std::smatch m;
        const std::string name = e.path().filename().string();
        if (e.is_directory() && std::regex_match(name, m, kName) && fs::exists(e.path() / "trainer_state.json")) {
            out.emplace_back(std::stoll(m[1].str()), e.path());
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::string
save_checkpoint(const TrainConfig& c, const llama::LlamaForCausalLM& m, const Optimizer& opt, const State& st) {
    const fs::path final_dir = fs::path(c.output_dir) / ("checkpoint-" + std::to_string(st.step));
    if (fs::exists(final_dir / "trainer_state.json")) {
        return final_dir.string(); // this step is already saved
    }
    fs::remove_all(final_dir); // not a complete checkpoint (never produced by this code, but never trusted either)
    trainer::write_directory_atomically(final_dir.string(), [&](const std::string& dir) {
        if (c.adapter == "none") {
            llama::save_model(m, dir);
        } else {
            llama::save_adapter(m, dir, c.base_model);
        }
        safetensors::save((fs::path(dir) / "optimizer.safetensors").string(), opt.state());
        safetensors::save(
            (fs::path(dir) / "rng.safetensors").string(),
            {{"cpu_generator", at::detail::getDefaultCPUGenerator().get_state()}}
        );
        nlohmann::json j = {
            {"format", "qlora-trainer-state"},
            {"version", 1},
            {"global_step", st.step},
            {"epoch", st.pos.epoch},
            {"row_in_epoch", st.pos.row},
            {"micro_batch_in_step", 0},
            {"tokens_seen", st.tokens_seen},
            {"trained_tokens_seen", st.trained_tokens_seen},
            {"config_fingerprint", config::fingerprint(c)},
            {"run_affecting", run_affecting_map(c)},
        };
        const std::string text = j.dump(2) + "\n";
        trainer::write_file_atomically((fs::path(dir) / "trainer_state.json").string(), [&](trainer::FileSink& out) {
            out.write(text.data(), text.size());
        });
    });
    if (c.save_total_limit > 0) {
        const auto all = checkpoints_in(c.output_dir);
        for (size_t i = 0; i + static_cast<size_t>(c.save_total_limit) < all.size(); ++i) {
            fs::remove_all(all[i].second);
        }
    }
    return final_dir.string();
}

// Restores a checkpoint directory into the model, optimizer and generator; returns the state and prints what it
// restored and any config drift.
State load_checkpoint(
    const TrainConfig& c, const fs::path& dir, llama::LlamaForCausalLM& m, Optimizer& opt, at::ScalarType dtype
) {
    const std::string state_file = (dir / "trainer_state.json").string();
    const nlohmann::json j = trainer::read_json_file(state_file);
    const auto integer = [&](const char* key) {
        if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() < 0) {
            fail(state_file + ": key '" + key + "' must be a non-negative integer");
        }
        return j[key].get<int64_t>();
    };
    if (j.value("format", "") != "qlora-trainer-state") {
        fail(state_file + ": not a qlora trainer state (key 'format')");
    }
    State st;
    st.step = integer("global_step");
    st.pos.epoch = integer("epoch");
    st.pos.row = integer("row_in_epoch");
    st.tokens_seen = integer("tokens_seen");
    st.trained_tokens_seen = integer("trained_tokens_seen");
    if (integer("micro_batch_in_step") != 0) {
        fail(state_file + ": key 'micro_batch_in_step' must be 0 (checkpoints are taken between optimizer steps)");
    }
    // Config drift: every run-affecting key that changed.
    const auto now = run_affecting_map(c);
    std::vector<std::string> drift;
    if (j.contains("run_affecting") && j["run_affecting"].is_object()) {
        for (const auto& [k, v] : now) {
            const std::string was = j["run_affecting"].contains(k) && j["run_affecting"][k].is_string()
                                        ? j["run_affecting"][k].get<std::string>()
                                        : std::string("(absent)");
            if (was != v) {
                drift.push_back(k + ": " + was + " -> " + v);
            }
        }
    }
    if (c.adapter == "none") {
        llama::load_weights(m, safetensors::Checkpoint::open(dir.string()), dtype);
    } else {
        llama::load_adapter(m, dir.string());
    }
    const safetensors::File of = safetensors::File::open((dir / "optimizer.safetensors").string());
    std::map<std::string, at::Tensor> ot;
    for (const auto& t : of.header().tensors) {
        ot[t.name] = of.read(t.name);
    }
    opt.load(ot, of.path());
    const safetensors::File rf = safetensors::File::open((dir / "rng.safetensors").string());
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(rf.read("cpu_generator"));
    std::printf(
        "resumed from %s: step %lld, epoch %lld row %lld, %s tokens seen; restored the %s, the optimizer state "
        "(%zu tensors), the learning-rate schedule position, the random generator and the data position\n",
        dir.c_str(), static_cast<long long>(st.step), static_cast<long long>(st.pos.epoch),
        static_cast<long long>(st.pos.row), with_commas(st.tokens_seen).c_str(),
        c.adapter == "none" ? "model weights" : "adapter", ot.size()
    );
    if (!drift.empty()) {
        std::printf("config drift since the checkpoint (the run will differ from an uninterrupted one):\n");
        for (const std::string& d : drift) {
            std::printf("  %s\n", d.c_str());
        }
    }
    return st;
}

// --------------------------------------------------------------------------------------------------------------
// Evaluation and logging

double evaluate(llama::LlamaForCausalLM& m, const std::vector<data::Example>& val, const TrainConfig& c, int32_t pad) {
    if (val.empty()) {
        return std::nan("");
    }
    m->eval();
    torch::NoGradGuard no_grad;
    std::vector<int64_t> order(val.size());
    for (size_t i = 0; i < order.size(); ++i) {
        order[i] = static_cast<int64_t>(i);
    }
    const auto rows = c.sample_packing ? data::pack(val, order, c.sequence_len) : data::unpacked(order);
    double sum = 0.0;
    int64_t n = 0;
    for (size_t r = 0; r < rows.size(); r += static_cast<size_t>(c.micro_batch_size)) {
        const std::vector<std::vector<int64_t>> mb(
            rows.begin() + static_cast<std::ptrdiff_t>(r),
            rows.begin() +
                static_cast<std::ptrdiff_t>(std::min(rows.size(), r + static_cast<size_t>(c.micro_batch_size)))
        );
        const auto [loss, count] = loss_sum(m, make_batch(val, mb, c.sample_packing, c.sequence_len, pad));
        sum += loss.item<double>();
        n += count;
    }
    m->train();
    return n > 0 ? sum / static_cast<double>(n) : std::nan("");
}

class Metrics {
  public:
    explicit Metrics(const std::string& path) : out_(path, std::ios::app) {
        if (!out_) {
            fail(path + ": cannot open for writing");
        }
    }
    void write(const nlohmann::json& j) {
        out_ << j.dump() << "\n";
        out_.flush();
    }

  private:
    std::ofstream out_;
};

} // namespace

Schedule parse_schedule(const std::string& name) {
    if (name == "constant") {
        return Schedule::kConstant;
    }
    if (name == "linear") {
        return Schedule::kLinear;
    }
    if (name == "cosine") {
        return Schedule::kCosine;
    }
    fail("lr_scheduler must be constant, linear or cosine, got '" + name + "'");
}

double lr_at(Schedule s, double base_lr, int64_t step, int64_t warmup, int64_t total) {
    if (step < warmup) {
        return base_lr * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
    }
    const double progress =
        static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
    switch (s) {
    case Schedule::kConstant:
        return base_lr;
    case Schedule::kLinear:
        return base_lr * std::max(0.0, 1.0 - progress);
    case Schedule::kCosine:
        return base_lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
    }
    return base_lr;
}

RunResult run(const TrainConfig& c, const RunOptions& options) {
    const auto t_start = std::chrono::steady_clock::now();
    at::set_num_threads(
        c.num_threads > 0 ? static_cast<int>(c.num_threads)
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))
    );
    fs::create_directories(c.output_dir);
    {
        const std::string text = config::to_yaml(c);
        trainer::write_file_atomically((fs::path(c.output_dir) / "config.yaml").string(), [&](trainer::FileSink& o) {
            o.write(text.data(), text.size());
        });
    }

    // Data: every file is read and checked before the model is touched.
    const data::Tokenizer tok = data::Tokenizer::load(c.tokenizer);
    const int32_t pad = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
    data::FormatOptions fo;
    fo.sequence_len = c.sequence_len;
    fo.train_on_inputs = c.train_on_inputs;
    std::vector<data::Example> all;
    data::DatasetStats total{};
    for (const auto& d : c.datasets) {
        data::DatasetStats st{};
        auto ex = data::load_jsonl(d.path, data::parse_format(d.type), tok, fo, &st);
        all.insert(all.end(), std::make_move_iterator(ex.begin()), std::make_move_iterator(ex.end()));
        total.lines += st.lines;
        total.examples += st.examples;
        total.truncated += st.truncated;
        total.no_target += st.no_target;
        total.ending_in_eos += st.ending_in_eos;
        total.tokens += st.tokens;
        total.trained_tokens += st.trained_tokens;
    }
    if (all.empty()) {
        fail("no training examples: every dataset is empty or every example lost its targets to truncation");
    }
    const auto n_all = static_cast<int64_t>(all.size());
    const int64_t n_val = c.val_set_size <= 0.0  ? 0
                          : c.val_set_size < 1.0 ? static_cast<int64_t>(std::llround(c.val_set_size * n_all))
                                                 : static_cast<int64_t>(c.val_set_size);
    if (n_val >= n_all) {
        fail(
            "val_set_size " + std::to_string(c.val_set_size) + " leaves no training examples out of " +
            std::to_string(n_all)
        );
    }
    std::vector<data::Example> train_ex, val_ex;
    {
        std::vector<int64_t> split = permutation(n_all, mix(static_cast<uint64_t>(c.seed), 0xe7a1));
        std::sort(split.begin(), split.begin() + n_val);
        std::sort(split.begin() + n_val, split.end());
        for (int64_t i = 0; i < n_all; ++i) {
            (i < n_val ? val_ex : train_ex).push_back(all[static_cast<size_t>(split[static_cast<size_t>(i)])]);
        }
    }
    all.clear();

    // Model.
    torch::manual_seed(static_cast<uint64_t>(c.seed));
    llama::LoadOptions lo;
    lo.dtype = c.bf16 ? at::kBFloat16 : at::kFloat;
    if (c.adapter != "none") {
        llama::LoraSpec spec;
        spec.target_modules = c.lora_target_modules;
        spec.r = c.lora_r;
        spec.lora_alpha = c.lora_alpha;
        spec.lora_dropout = c.lora_dropout;
        spec.use_rslora = c.peft_use_rslora;
        spec.load_in_4bit = c.load_in_4bit;
        lo.lora = spec;
    }
    llama::LlamaForCausalLM m = llama::load_model(c.base_model, lo);
    if (!c.lora_model_dir.empty()) {
        llama::load_adapter(m, c.lora_model_dir); // checks that r, alpha and targets match the config
    }
    if (c.adapter == "none") {
        for (auto& p : m->parameters()) {
            p.set_requires_grad(true);
        }
    }
    m->model->gradient_checkpointing = c.gradient_checkpointing;
    m->train();
    std::vector<at::Tensor> trainable;
    int64_t n_trainable = 0, n_total = 0;
    for (const auto& p : m->parameters()) {
        n_total += p.numel();
        if (p.requires_grad()) {
            trainable.push_back(p);
            n_trainable += p.numel();
        }
    }
    for (const auto& item : m->named_modules()) {
        if (const auto* proj = item.value()->as<llama::Projection>(); proj != nullptr && proj->quantized()) {
            n_total += proj->nf4.numel(); // NF4 weights counted at their logical size
        }
    }
    Optimizer opt = make_optimizer(c, trainable);
    const Schedule schedule = parse_schedule(c.lr_scheduler);

    // Step plan.
    Rows rows(train_ex, c.sample_packing, c.sequence_len, static_cast<uint64_t>(c.seed), c.shuffle_merged_datasets);
    const int64_t mb = c.micro_batch_size, accum = c.gradient_accumulation_steps;
    const auto rows0 = static_cast<int64_t>(rows.of(0).size());
    const int64_t mb_per_epoch = (rows0 + mb - 1) / mb;
    const int64_t total_steps =
        c.max_steps > 0
            ? c.max_steps
            : std::max<int64_t>(
                  1, static_cast<int64_t>(std::floor(c.num_epochs * static_cast<double>(mb_per_epoch) / accum))
              );
    const int64_t warmup = c.warmup_steps > 0
                               ? c.warmup_steps
                               : static_cast<int64_t>(std::ceil(c.warmup_ratio * static_cast<double>(total_steps)));

    // Leftovers of checkpoint writes that a crash interrupted are never used: remove them.
    for (const auto& e : fs::directory_iterator(c.output_dir)) {
        const std::string name = e.path().filename().string();
        if (e.is_directory() && name.rfind(".checkpoint-", 0) == 0 && name.size() > 8 &&
            name.compare(name.size() - 8, 8, ".partial") == 0) {
            std::printf("removing %s (a checkpoint write that did not finish)\n", e.path().c_str());
            fs::remove_all(e.path());
        }
    }

    // Resume.
    State st;
    if (!c.resume_from_checkpoint.empty()) {
        fs::path dir;
        if (c.resume_from_checkpoint == "auto") {
            const auto found = checkpoints_in(c.output_dir);
            if (!found.empty()) {
                dir = found.back().second;
            } else {
                std::printf(
                    "resume_from_checkpoint: auto: no checkpoint in %s, starting from step 0\n", c.output_dir.c_str()
                );
            }
        } else {
            dir = c.resume_from_checkpoint;
            if (!fs::exists(dir / "trainer_state.json")) {
                fail(c.resume_from_checkpoint + ": not a checkpoint directory (no trainer_state.json)");
            }
        }
        if (!dir.empty()) {
            st = load_checkpoint(c, dir, m, opt, lo.dtype);
        }
    }

    // Banner.
    const double eos_share =
        total.examples > 0 ? 100.0 * static_cast<double>(total.ending_in_eos) / static_cast<double>(total.examples)
                           : 0.0;
    std::printf(
        "qlora train: %s (%s, %s compute)\n"
        "  data: %lld examples (%lld train, %lld validation) from %zu dataset(s), %s tokens, %s trained; "
        "%.1f%% of examples end in a trained EOS; %lld truncated to %lld tokens; %lld dropped with no target left\n"
        "  rows: %lld per epoch (%s), %lld micro-batches per epoch\n"
        "  steps: %lld (%s), %lld row(s) per micro-batch x %lld accumulation = %lld rows per step, warmup %lld, "
        "schedule %s, lr %.3g, optimizer %s\n"
        "  parameters: %s trainable of %s (%.3f%%), %s\n",
        c.base_model.c_str(), c.adapter == "none" ? "full fine-tuning" : (c.load_in_4bit ? "QLoRA" : "LoRA"),
        c.bf16 ? "bfloat16" : "float32", static_cast<long long>(total.examples),
        static_cast<long long>(train_ex.size()), static_cast<long long>(val_ex.size()), c.datasets.size(),
        with_commas(total.tokens).c_str(), with_commas(total.trained_tokens).c_str(), eos_share,
        static_cast<long long>(total.truncated), static_cast<long long>(c.sequence_len),
        static_cast<long long>(total.no_target), static_cast<long long>(rows0),
        c.sample_packing ? "packed" : "one example each", static_cast<long long>(mb_per_epoch),
        static_cast<long long>(total_steps),
        c.max_steps > 0 ? "max_steps" : (std::to_string(c.num_epochs) + " epoch(s)").c_str(),
        static_cast<long long>(mb), static_cast<long long>(accum), static_cast<long long>(mb * accum),
        static_cast<long long>(warmup), c.lr_scheduler.c_str(), c.learning_rate, c.optimizer.c_str(),
        with_commas(n_trainable).c_str(), with_commas(n_total).c_str(),
        100.0 * static_cast<double>(n_trainable) / static_cast<double>(std::max<int64_t>(1, n_total)),
        c.gradient_checkpointing ? "activation checkpointing on" : "activation checkpointing off"
    );
    std::fflush(stdout);

    Metrics metrics((fs::path(c.output_dir) / "metrics.jsonl").string());
    RunResult result;
    const auto t_loop = std::chrono::steady_clock::now();
    int64_t tokens_this_run = 0;
    const int64_t first_step = st.step;
    double last_eval = std::nan("");
    std::unique_ptr<trainer::StepProfiler> profiler;
    double profiler_s = 0.0;            // writing the profile's files: left out of elapsed time and tokens/s
    if (!options.profile_dir.empty()) { // from the second step of this run if there is one (the first touches memory)
        profiler = std::make_unique<trainer::StepProfiler>(
            options.profile_dir, first_step + (total_steps - first_step >= 2 ? 2 : 1), options.profile_steps
        );
    }
    while (st.step < total_steps) {
        if (profiler) {
            profiler->begin(st.step + 1);
        }
        // Gather the step's micro-batches (the data position moves only when the step completes).
        Position pos = st.pos;
        std::vector<data::Batch> batches;
        int64_t n_targets = 0;
        for (int64_t k = 0; k < accum; ++k) {
            const auto& epoch_rows = rows.of(pos.epoch);
            if (pos.row >= static_cast<int64_t>(epoch_rows.size())) {
                pos = {pos.epoch + 1, 0};
            }
            const auto& er = rows.of(pos.epoch);
            const int64_t end = std::min<int64_t>(static_cast<int64_t>(er.size()), pos.row + mb);
            const std::vector<std::vector<int64_t>> mbrows(er.begin() + pos.row, er.begin() + end);
            batches.push_back(make_batch(train_ex, mbrows, c.sample_packing, c.sequence_len, pad));
            n_targets += shifted_targets(batches.back()).ne(-100).sum().item<int64_t>();
            pos.row = end;
        }
        const double lr = lr_at(schedule, c.learning_rate, st.step, warmup, total_steps);
        opt.set_lr(lr);
        double step_loss = 0.0;
        int64_t step_tokens = 0;
        for (const auto& b : batches) {
            at::Tensor loss;
            double v = 0.0;
            {
                RECORD_USER_SCOPE("qlora.forward");
                loss = loss_sum(m, b).first;
                v = loss.item<double>();
            }
            if (!std::isfinite(v)) {
                fail(
                    "step " + std::to_string(st.step + 1) + ": the loss is " + std::to_string(v) +
                    "; stopping without saving (the last checkpoint, if any, is intact)"
                );
            }
            step_loss += v;
            step_tokens += b.tokens;
            if (n_targets > 0) {
                RECORD_USER_SCOPE("qlora.backward");
                (loss / static_cast<double>(n_targets)).backward();
            }
        }
        double grad_norm = 0.0;
        {
            RECORD_USER_SCOPE("qlora.optimizer"); // the gradient norm (clipping), the step and zero_grad
            std::vector<at::Tensor> grads;
            for (const auto& p : trainable) {
                if (p.grad().defined()) {
                    grads.push_back(p.grad());
                }
            }
            if (c.max_grad_norm > 0) {
                grad_norm = torch::nn::utils::clip_grad_norm_(trainable, c.max_grad_norm);
            } else if (!grads.empty()) {
                double sq = 0.0;
                for (const auto& g : grads) {
                    sq += g.to(at::kDouble).pow(2).sum().item<double>();
                }
                grad_norm = std::sqrt(sq);
            }
        }
        if (!std::isfinite(grad_norm)) {
            fail(
                "step " + std::to_string(st.step + 1) +
                ": the gradient norm is not finite; stopping without saving (the last checkpoint, if any, is intact)"
            );
        }
        {
            RECORD_USER_SCOPE("qlora.optimizer");
            opt.opt->step();
            opt.opt->zero_grad();
        }
        ++st.step;
        if (profiler) {
            profiler_s += profiler->end(st.step, step_tokens);
        }
        st.pos = pos;
        st.tokens_seen += step_tokens;
        st.trained_tokens_seen += n_targets;
        tokens_this_run += step_tokens;
        const double loss = n_targets > 0 ? step_loss / static_cast<double>(n_targets) : 0.0;
        result.final_loss = loss;
        result.steps_done = st.step;

        const double elapsed =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t_loop).count() - profiler_s;
        const double tps = elapsed > 0 ? static_cast<double>(tokens_this_run) / elapsed : 0.0;
        const double eta =
            elapsed / static_cast<double>(st.step - first_step) * static_cast<double>(total_steps - st.step);
        const double epoch_f =
            static_cast<double>(st.pos.epoch) +
            static_cast<double>(st.pos.row) / static_cast<double>(std::max<size_t>(1, rows.of(st.pos.epoch).size()));
        const bool log_now = st.step % std::max<int64_t>(1, c.logging_steps) == 0 || st.step == total_steps;
        if (log_now) {
            metrics.write(
                {{"step", st.step},
                 {"epoch", epoch_f},
                 {"loss", loss},
                 {"lr", lr},
                 {"grad_norm", grad_norm},
                 {"tokens_per_s", tps},
                 {"tokens_seen", st.tokens_seen},
                 {"trained_tokens_seen", st.trained_tokens_seen},
                 {"peak_rss_bytes", trainer::peak_resident_bytes()},
                 {"elapsed_s", elapsed}}
            );
        }
        if (options.progress_bar) {
            const int width = 24;
            const int filled = static_cast<int>(width * st.step / total_steps);
            std::fprintf(
                stderr, "\r[%s%s] %lld/%lld loss %.4f lr %.2e tok/s %.0f elapsed %s ETA %s   ",
                std::string(static_cast<size_t>(filled), '#').c_str(),
                std::string(static_cast<size_t>(width - filled), '.').c_str(), static_cast<long long>(st.step),
                static_cast<long long>(total_steps), loss, lr, tps, hms(elapsed).c_str(), hms(eta).c_str()
            );
            std::fflush(stderr);
        } else if (log_now) {
            std::printf(
                "step %lld/%lld loss %.4f lr %.3e grad_norm %.4f tok/s %.0f elapsed %s eta %s\n",
                static_cast<long long>(st.step), static_cast<long long>(total_steps), loss, lr, grad_norm, tps,
                hms(elapsed).c_str(), hms(eta).c_str()
            );
            std::fflush(stdout);
        }
        const bool last = st.step == total_steps;
        if (!val_ex.empty() && ((c.eval_steps > 0 && st.step % c.eval_steps == 0) || last)) {
            last_eval = evaluate(m, val_ex, c, pad);
            metrics.write({{"step", st.step}, {"eval_loss", last_eval}, {"eval_ppl", std::exp(last_eval)}});
            std::printf(
                "%seval step %lld: loss %.4f perplexity %.3f\n", options.progress_bar ? "\n" : "",
                static_cast<long long>(st.step), last_eval, std::exp(last_eval)
            );
            std::fflush(stdout);
        }
        const bool stop = options.stop != nullptr && options.stop->load();
        if (last || stop || (c.save_steps > 0 && st.step % c.save_steps == 0)) {
            result.last_checkpoint = save_checkpoint(c, m, opt, st);
        }
        if (stop && !last) {
            result.interrupted = true;
            if (options.progress_bar) {
                std::fprintf(stderr, "\n");
            }
            std::printf(
                "interrupted after step %lld; checkpoint %s (continue with resume_from_checkpoint: auto)\n",
                static_cast<long long>(st.step), result.last_checkpoint.c_str()
            );
            return result;
        }
    }
    if (options.progress_bar) {
        std::fprintf(stderr, "\n");
    }
    // The final adapter (or model) at the top of output_dir, as Hugging Face's Trainer leaves it.
    if (c.adapter == "none") {
        llama::save_model(m, c.output_dir);
    } else {
        llama::save_adapter(m, c.output_dir, c.base_model);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    std::printf(
        "done: %lld steps, final loss %.4f%s, %s; saved to %s (peak RSS %.2f GiB)\n", static_cast<long long>(st.step),
        result.final_loss, std::isnan(last_eval) ? "" : (", eval loss " + std::to_string(last_eval)).c_str(),
        hms(seconds).c_str(), c.output_dir.c_str(), static_cast<double>(trainer::peak_resident_bytes()) / (1 << 30)
    );
    return result;
}

} // namespace qlora::train
