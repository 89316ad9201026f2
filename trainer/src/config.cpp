// trainer/src/config.cpp: see qlora/trainer/config.h.
#include "qlora/trainer/config.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include <yaml-cpp/yaml.h>

namespace qlora::config {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kLinear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) {
        prev[j] = j;
    }
    for (size_t i = 1; i <= a.size(); ++i) {
        cur[0] = i;
        for (size_t j = 1; j <= b.size(); ++j) {
            cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
        }
        std::swap(prev, cur);
    }
    return prev[b.size()];
}

std::string did_you_mean(const std::string& key, const std::vector<std::string>& known) {
    std::string best;
    size_t best_d = key.size() / 2 + 2;
    for (const std::string& k : known) {
        const size_t d = edit_distance(key, k);
        if (d < best_d) {
            best_d = d;
            best = k;
        }
    }
    return best.empty() ? "" : "; did you mean '" + best + "'?";
}

std::string shown(const YAML::Node& n) {
    if (n.IsScalar()) {
        return "\"" + n.Scalar() + "\"";
    }
    if (n.IsSequence()) {
        return "a list";
    }
    if (n.IsMap()) {
        return "a map";
    }
    return "nothing";
}

// Reads one config document; `where(key)` gives the location prefix of a key for messages.
class Reader {
  public:
    Reader(std::string what, std::map<std::string, std::string> overridden)
        : what_(std::move(what)), overridden_(std::move(overridden)) {}

    std::string where(const std::string& key, const YAML::Node& n) const {
        const auto it = overridden_.find(key);
        if (it != overridden_.end()) {
            return "override '" + it->second + "'";
        }
        const YAML::Mark m = n.Mark();
        return m.line >= 0 ? what_ + ":" + std::to_string(m.line + 1) : what_;
    }
    [[noreturn]] void fail(const std::string& key, const YAML::Node& n, const std::string& msg) const {
        throw std::runtime_error(where(key, n) + ": key '" + key + "' " + msg);
    }

    std::string str(const std::string& key, const YAML::Node& n) const {
        if (!n.IsScalar()) {
            fail(key, n, "must be a string, got " + shown(n));
        }
        return n.Scalar();
    }
    bool boolean(const std::string& key, const YAML::Node& n) const {
        bool v = false;
        if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v)) {
            fail(key, n, "must be true or false, got " + shown(n));
        }
        return v;
    }
    int64_t integer(const std::string& key, const YAML::Node& n, int64_t min) const {
        long long v = 0;
        if (!n.IsScalar() || !YAML::convert<long long>::decode(n, v) || v < min) {
            fail(
                key, n,
                (min > 0    ? "must be a positive integer"
                 : min == 0 ? "must be an integer >= 0"
                            : "must be an integer") +
                    std::string(", got ") + shown(n)
            );
        }
        return v;
    }
    double
    number(const std::string& key, const YAML::Node& n, double lo, double hi, bool hi_open, const char* range) const {
        double v = 0;
        if (!n.IsScalar() || !YAML::convert<double>::decode(n, v) || !std::isfinite(v) || v < lo ||
            (hi_open ? v >= hi : v > hi)) {
            fail(key, n, std::string("must be a number ") + range + ", got " + shown(n));
        }
        return v;
    }
    std::string choice(const std::string& key, const YAML::Node& n, const std::vector<std::string>& allowed) const {
        const std::string v = n.IsScalar() ? n.Scalar() : "";
        if (std::find(allowed.begin(), allowed.end(), v) == allowed.end()) {
            std::string list;
            for (const auto& a : allowed) {
                list += (list.empty() ? "" : ", ") + a;
            }
            fail(key, n, "must be one of " + list + ", got " + shown(n));
        }
        return v;
    }

  private:
    std::string what_;
    std::map<std::string, std::string> overridden_;
};

std::string resolve(const std::string& base_dir, const std::string& p) {
    if (p.empty()) {
        return p;
    }
    const fs::path path(p);
    return (path.is_absolute() ? path : fs::path(base_dir) / path).lexically_normal().string();
}

bool cpu_has_avx512_bf16() {
    std::ifstream f("/proc/cpuinfo");
    for (std::string line; std::getline(f, line);) {
        if (line.rfind("flags", 0) == 0) {
            return line.find(" avx512_bf16") != std::string::npos;
        }
    }
    return false;
}

// Applies one "a.b.c=value" override to `root`.
void apply_override(YAML::Node root, const std::string& text, std::map<std::string, std::string>& overridden) {
    const size_t eq = text.find('=');
    if (eq == std::string::npos || eq == 0) {
        throw std::runtime_error("override '" + text + "': expected key=value");
    }
    const std::string key = text.substr(0, eq);
    YAML::Node value;
    try {
        value = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
        throw std::runtime_error("override '" + text + "': the value is not valid YAML (" + e.msg + ")");
    }
    std::vector<std::string> parts;
    std::stringstream s(key);
    for (std::string p; std::getline(s, p, '.');) {
        if (p.empty()) {
            throw std::runtime_error("override '" + text + "': empty component in the key");
        }
        parts.push_back(p);
    }
    std::vector<YAML::Node> path = {root};
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
        YAML::Node cur = path.back();
        const std::string& p = parts[i];
        if (cur.IsSequence()) {
            if (!std::all_of(p.begin(), p.end(), ::isdigit) || std::stoul(p) >= cur.size()) {
                throw std::runtime_error("override '" + text + "': '" + p + "' is not an index of the list");
            }
            path.push_back(cur[std::stoul(p)]);
        } else {
            if (!cur[p]) {
                throw std::runtime_error("override '" + text + "': no '" + p + "' to descend into");
            }
            path.push_back(cur[p]);
        }
    }
    YAML::Node last = path.back();
    if (last.IsSequence()) {
        const std::string& p = parts.back();
        if (!std::all_of(p.begin(), p.end(), ::isdigit) || std::stoul(p) >= last.size()) {
            throw std::runtime_error("override '" + text + "': '" + p + "' is not an index of the list");
        }
        last[std::stoul(p)] = value;
    } else {
        last[parts.back()] = value;
    }
    overridden[parts.front() == "datasets" && parts.size() > 2 ? parts[2] : parts.front()] = text;
    overridden[key] = text;
}

} // namespace

TrainConfig parse(
    const std::string& text, const std::string& what, const std::string& base_dir,
    const std::vector<std::string>& overrides
) {
    YAML::Node root;
    try {
        root = YAML::Load(text);
    } catch (const YAML::ParserException& e) {
        throw std::runtime_error(what + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
    }
    if (!root.IsMap()) {
        throw std::runtime_error(what + ": expected a map of config keys at the top level");
    }
    std::map<std::string, std::string> overridden;
    const std::vector<std::string> known = {
        "base_model",
        "tokenizer",
        "adapter",
        "load_in_4bit",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_target_linear",
        "peft_use_rslora",
        "lora_model_dir",
        "datasets",
        "val_set_size",
        "shuffle_merged_datasets",
        "sequence_len",
        "sample_packing",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "num_epochs",
        "max_steps",
        "optimizer",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lr_scheduler",
        "learning_rate",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "gradient_checkpointing",
        "bf16",
        "train_on_inputs",
        "seed",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "output_dir",
        "resume_from_checkpoint",
        "num_threads"};
    // Duplicate and unknown keys, checked before overrides so that lines refer to the file.
    {
        std::set<std::string> seen;
        for (const auto& kv : root) {
            const std::string k = kv.first.Scalar();
            const std::string at = what + ":" + std::to_string(kv.first.Mark().line + 1);
            if (!seen.insert(k).second) {
                throw std::runtime_error(at + ": key '" + k + "' appears twice");
            }
            if (std::find(known.begin(), known.end(), k) == known.end()) {
                throw std::runtime_error(at + ": unknown key '" + k + "'" + did_you_mean(k, known));
            }
        }
    }
    for (const std::string& o : overrides) {
        const std::string key = o.substr(0, o.find('='));
        const std::string top = key.substr(0, key.find('.'));
        if (std::find(known.begin(), known.end(), top) == known.end()) {
            throw std::runtime_error("override '" + o + "': unknown key '" + top + "'" + did_you_mean(top, known));
        }
        apply_override(root, o, overridden);
    }
    const Reader r(what, overridden);
    TrainConfig c;
    const auto has = [&](const char* k) {
        return root[k] && !root[k].IsNull();
    };
    const auto node = [&](const char* k) {
        return root[k];
    };
    const auto require = [&](const char* k) {
        if (!has(k)) {
            throw std::runtime_error(what + ": required key '" + std::string(k) + "' is missing");
        }
    };
    require("base_model");
    require("datasets");
    require("output_dir");
    c.base_model = resolve(base_dir, r.str("base_model", node("base_model")));
    c.tokenizer = has("tokenizer") ? resolve(base_dir, r.str("tokenizer", node("tokenizer")))
                                   : (fs::path(c.base_model) / "tokenizer.model").string();
    if (has("adapter")) {
        c.adapter = r.choice("adapter", node("adapter"), {"qlora", "lora", "none"});
    }
    c.load_in_4bit = has("load_in_4bit") ? r.boolean("load_in_4bit", node("load_in_4bit")) : c.adapter == "qlora";
    if (c.adapter == "qlora" && !c.load_in_4bit) {
        r.fail(
            "load_in_4bit", node("load_in_4bit"), "must be true with adapter: qlora (use adapter: lora for 16/32-bit)"
        );
    }
    if (c.adapter != "qlora" && c.load_in_4bit) {
        r.fail(
            "load_in_4bit", node("load_in_4bit"),
            "is true but adapter is " + c.adapter + " (4-bit needs adapter: qlora)"
        );
    }
    if (has("lora_r")) {
        c.lora_r = r.integer("lora_r", node("lora_r"), 1);
    }
    if (has("lora_alpha")) {
        c.lora_alpha = r.number("lora_alpha", node("lora_alpha"), 1e-12, 1e12, false, "> 0");
    }
    if (has("lora_dropout")) {
        c.lora_dropout = r.number("lora_dropout", node("lora_dropout"), 0.0, 1.0, true, "in [0, 1)");
    }
    if (has("lora_target_linear")) {
        c.lora_target_linear = r.boolean("lora_target_linear", node("lora_target_linear"));
    }
    if (has("lora_target_modules")) {
        const YAML::Node t = node("lora_target_modules");
        if (!t.IsSequence()) {
            r.fail("lora_target_modules", t, "must be a list of module names, got " + shown(t));
        }
        for (const auto& m : t) {
            std::vector<std::string> allowed = kLinear;
            allowed.push_back("lm_head");
            const std::string name = r.choice("lora_target_modules", m, allowed);
            if (std::find(c.lora_target_modules.begin(), c.lora_target_modules.end(), name) ==
                c.lora_target_modules.end()) {
                c.lora_target_modules.push_back(name);
            }
        }
    }
    if (c.lora_target_linear) {
        for (const std::string& m : kLinear) {
            if (std::find(c.lora_target_modules.begin(), c.lora_target_modules.end(), m) ==
                c.lora_target_modules.end()) {
                c.lora_target_modules.push_back(m);
            }
        }
    }
    if (c.adapter != "none" && c.lora_target_modules.empty()) {
        throw std::runtime_error(
            what + ": no LoRA targets: set lora_target_linear: true or list lora_target_modules (e.g. [q_proj, v_proj])"
        );
    }
    if (has("peft_use_rslora")) {
        c.peft_use_rslora = r.boolean("peft_use_rslora", node("peft_use_rslora"));
    }
    if (has("lora_model_dir")) {
        c.lora_model_dir = resolve(base_dir, r.str("lora_model_dir", node("lora_model_dir")));
    }
    {
        const YAML::Node d = node("datasets");
        if (!d.IsSequence() || d.size() == 0) {
            r.fail("datasets", d, "must be a non-empty list of {path, type} entries, got " + shown(d));
        }
        for (const auto& e : d) {
            if (!e.IsMap()) {
                r.fail("datasets", e, "entries must be maps with path and type, got " + shown(e));
            }
            Dataset ds;
            for (const auto& kv : e) {
                const std::string k = kv.first.Scalar();
                if (k == "path") {
                    ds.path = resolve(base_dir, r.str("path", kv.second));
                } else if (k == "type") {
                    ds.type = r.choice("type", kv.second, {"alpaca", "chat", "completion", "text"});
                } else {
                    r.fail(
                        "datasets", kv.first, "entry has unknown key '" + k + "'" + did_you_mean(k, {"path", "type"})
                    );
                }
            }
            if (ds.path.empty() || ds.type.empty()) {
                r.fail("datasets", e, "entries need both path and type");
            }
            c.datasets.push_back(ds);
        }
    }
    if (has("val_set_size")) {
        const double v = r.number("val_set_size", node("val_set_size"), 0.0, 1e15, false, ">= 0");
        if (v >= 1.0 && v != std::floor(v)) {
            r.fail(
                "val_set_size", node("val_set_size"),
                "must be a fraction below 1 or a whole count, got " + shown(node("val_set_size"))
            );
        }
        c.val_set_size = v;
    }
    const auto set_bool = [&](const char* k, bool& out) {
        if (has(k)) {
            out = r.boolean(k, node(k));
        }
    };
    const auto set_int = [&](const char* k, int64_t& out, int64_t min) {
        if (has(k)) {
            out = r.integer(k, node(k), min);
        }
    };
    set_bool("shuffle_merged_datasets", c.shuffle_merged_datasets);
    set_int("sequence_len", c.sequence_len, 1);
    set_bool("sample_packing", c.sample_packing);
    set_int("micro_batch_size", c.micro_batch_size, 1);
    set_int("gradient_accumulation_steps", c.gradient_accumulation_steps, 1);
    if (has("num_epochs")) {
        c.num_epochs = r.number("num_epochs", node("num_epochs"), 1e-12, 1e9, false, "> 0");
    }
    set_int("max_steps", c.max_steps, -1);
    if (has("optimizer")) {
        c.optimizer = r.choice(
            "optimizer", node("optimizer"), {"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"}
        );
    }
    if (has("adam_beta1")) {
        c.adam_beta1 = r.number("adam_beta1", node("adam_beta1"), 0.0, 1.0, true, "in [0, 1)");
    }
    if (has("adam_beta2")) {
        c.adam_beta2 = r.number("adam_beta2", node("adam_beta2"), 0.0, 1.0, true, "in [0, 1)");
    }
    if (has("adam_epsilon")) {
        c.adam_epsilon = r.number("adam_epsilon", node("adam_epsilon"), 0.0, 1.0, false, "in [0, 1]");
    }
    if (has("lr_scheduler")) {
        c.lr_scheduler = r.choice("lr_scheduler", node("lr_scheduler"), {"constant", "linear", "cosine"});
    }
    if (has("learning_rate")) {
        c.learning_rate = r.number("learning_rate", node("learning_rate"), 0.0, 1e3, false, ">= 0");
    }
    if (has("warmup_steps") && has("warmup_ratio")) {
        r.fail("warmup_ratio", node("warmup_ratio"), "cannot be given together with warmup_steps");
    }
    set_int("warmup_steps", c.warmup_steps, 0);
    if (has("warmup_ratio")) {
        c.warmup_ratio = r.number("warmup_ratio", node("warmup_ratio"), 0.0, 1.0, true, "in [0, 1)");
    }
    if (has("weight_decay")) {
        c.weight_decay = r.number("weight_decay", node("weight_decay"), 0.0, 1e3, false, ">= 0");
    }
    if (has("max_grad_norm")) {
        c.max_grad_norm = r.number("max_grad_norm", node("max_grad_norm"), 0.0, 1e12, false, ">= 0");
    }
    set_bool("gradient_checkpointing", c.gradient_checkpointing);
    if (has("bf16")) {
        const YAML::Node b = node("bf16");
        c.bf16 = b.IsScalar() && b.Scalar() == "auto" ? cpu_has_avx512_bf16() : r.boolean("bf16", b);
    }
    set_bool("train_on_inputs", c.train_on_inputs);
    set_int("seed", c.seed, 0);
    set_int("logging_steps", c.logging_steps, 1);
    set_int("eval_steps", c.eval_steps, 0);
    set_int("save_steps", c.save_steps, 0);
    set_int("save_total_limit", c.save_total_limit, 0);
    c.output_dir = resolve(base_dir, r.str("output_dir", node("output_dir")));
    if (has("resume_from_checkpoint")) {
        const std::string v = r.str("resume_from_checkpoint", node("resume_from_checkpoint"));
        c.resume_from_checkpoint = v == "auto" ? v : resolve(base_dir, v);
    }
    set_int("num_threads", c.num_threads, 0);
    return c;
}

TrainConfig load(const std::string& path, const std::vector<std::string>& overrides) {
    std::ifstream f(path);
    if (!f) {
        throw std::runtime_error(path + ": cannot open the config file");
    }
    std::stringstream s;
    s << f.rdbuf();
    const std::string dir = fs::absolute(fs::path(path)).parent_path().string();
    return parse(s.str(), path, dir, overrides);
}

namespace {

std::string num(double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    return buf;
}

std::string quoted(const std::string& s) {
    YAML::Emitter e;
    e << YAML::DoubleQuoted << s;
    return e.c_str();
}

std::string list(const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) {
        s += (i ? ", " : "") + v[i];
    }
    return s + "]";
}

} // namespace

std::vector<std::pair<std::string, std::string>> run_affecting(const TrainConfig& c) {
    std::string ds;
    for (const auto& d : c.datasets) {
        ds += (ds.empty() ? "" : ", ") + d.path + " (" + d.type + ")";
    }
    return {
        {"base_model", c.base_model},
        {"tokenizer", c.tokenizer},
        {"adapter", c.adapter},
        {"load_in_4bit", c.load_in_4bit ? "true" : "false"},
        {"lora_r", std::to_string(c.lora_r)},
        {"lora_alpha", num(c.lora_alpha)},
        {"lora_dropout", num(c.lora_dropout)},
        {"lora_target_modules", list(c.lora_target_modules)},
        {"peft_use_rslora", c.peft_use_rslora ? "true" : "false"},
        {"lora_model_dir", c.lora_model_dir},
        {"datasets", ds},
        {"val_set_size", num(c.val_set_size)},
        {"shuffle_merged_datasets", c.shuffle_merged_datasets ? "true" : "false"},
        {"sequence_len", std::to_string(c.sequence_len)},
        {"sample_packing", c.sample_packing ? "true" : "false"},
        {"micro_batch_size", std::to_string(c.micro_batch_size)},
        {"gradient_accumulation_steps", std::to_string(c.gradient_accumulation_steps)},
        {"num_epochs", num(c.num_epochs)},
        {"max_steps", std::to_string(c.max_steps)},
        {"optimizer", c.optimizer},
        {"adam_beta1", num(c.adam_beta1)},
        {"adam_beta2", num(c.adam_beta2)},
        {"adam_epsilon", num(c.adam_epsilon)},
        {"lr_scheduler", c.lr_scheduler},
        {"learning_rate", num(c.learning_rate)},
        {"warmup_steps", std::to_string(c.warmup_steps)},
        {"warmup_ratio", num(c.warmup_ratio)},
        {"weight_decay", num(c.weight_decay)},
        {"max_grad_norm", num(c.max_grad_norm)},
        {"gradient_checkpointing", c.gradient_checkpointing ? "true" : "false"},
        {"bf16", c.bf16 ? "true" : "false"},
        {"train_on_inputs", c.train_on_inputs ? "true" : "false"},
        {"seed", std::to_string(c.seed)},
    };
}

std::string fingerprint(const TrainConfig& c) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const auto& [k, v] : run_affecting(c)) {
        for (const std::string& s : {k, std::string("="), v, std::string("\n")}) {
            for (const unsigned char ch : s) {
                h = (h ^ ch) * 0x100000001b3ull;
            }
        }
    }
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
    return buf;
}

std::string to_yaml(const TrainConfig& c) {
    std::string y = "# the resolved configuration of this run (written by qlora train)\n";
    const auto kv = [&](const std::string& k, const std::string& v) {
        y += k + ": " + v + "\n";
    };
    const auto b = [](bool v) {
        return std::string(v ? "true" : "false");
    };
    kv("base_model", quoted(c.base_model));
    kv("tokenizer", quoted(c.tokenizer));
    kv("adapter", c.adapter);
    kv("load_in_4bit", b(c.load_in_4bit));
    kv("lora_r", std::to_string(c.lora_r));
    kv("lora_alpha", num(c.lora_alpha));
    kv("lora_dropout", num(c.lora_dropout));
    kv("lora_target_modules", list(c.lora_target_modules));
    kv("lora_target_linear", b(c.lora_target_linear));
    kv("peft_use_rslora", b(c.peft_use_rslora));
    if (!c.lora_model_dir.empty()) {
        kv("lora_model_dir", quoted(c.lora_model_dir));
    }
    y += "datasets:\n";
    for (const auto& d : c.datasets) {
        y += "  - path: " + quoted(d.path) + "\n    type: " + d.type + "\n";
    }
    kv("val_set_size", num(c.val_set_size));
    kv("shuffle_merged_datasets", b(c.shuffle_merged_datasets));
    kv("sequence_len", std::to_string(c.sequence_len));
    kv("sample_packing", b(c.sample_packing));
    kv("micro_batch_size", std::to_string(c.micro_batch_size));
    kv("gradient_accumulation_steps", std::to_string(c.gradient_accumulation_steps));
    kv("num_epochs", num(c.num_epochs));
    kv("max_steps", std::to_string(c.max_steps));
    kv("optimizer", c.optimizer);
    kv("adam_beta1", num(c.adam_beta1));
    kv("adam_beta2", num(c.adam_beta2));
    kv("adam_epsilon", num(c.adam_epsilon));
    kv("lr_scheduler", c.lr_scheduler);
    kv("learning_rate", num(c.learning_rate));
    if (c.warmup_ratio > 0) {
        kv("warmup_ratio", num(c.warmup_ratio));
    } else {
        kv("warmup_steps", std::to_string(c.warmup_steps));
    }
    kv("weight_decay", num(c.weight_decay));
    kv("max_grad_norm", num(c.max_grad_norm));
    kv("gradient_checkpointing", b(c.gradient_checkpointing));
    kv("bf16", b(c.bf16));
    kv("train_on_inputs", b(c.train_on_inputs));
    kv("seed", std::to_string(c.seed));
    kv("logging_steps", std::to_string(c.logging_steps));
    kv("eval_steps", std::to_string(c.eval_steps));
    kv("save_steps", std::to_string(c.save_steps));
    kv("save_total_limit", std::to_string(c.save_total_limit));
    kv("output_dir", quoted(c.output_dir));
    if (!c.resume_from_checkpoint.empty()) {
        kv("resume_from_checkpoint", quoted(c.resume_from_checkpoint));
    }
    kv("num_threads", std::to_string(c.num_threads));
    return y;
}

} // namespace qlora::config
