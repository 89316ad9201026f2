// trainer/src/config.cpp: see qlora/trainer/config.h. One table (keys()) lists every key with its reader and its
// canonical YAML; the set of known keys, to_yaml and run_affecting all come from it. Checks that involve several keys
// (required keys, adapter vs load_in_4bit, LoRA targets, warmup) run after the table.
#include "qlora/trainer/config.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <type_traits>

#include <yaml-cpp/yaml.h>

namespace qlora::config {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxConfigBytes = size_t{1} << 20; // a config is a page of keys; a bigger file is not one (Y1)

const std::vector<std::string> kLinear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
const std::vector<std::string> kDatasetKeys = {"path", "type"};

// --------------------------------------------------------------------------------------------------------------
// Messages: one line, user text escaped and shortened

// `s` with newlines, tabs and control bytes escaped (and `"` and backslash too when `quotes`), cut at `max` bytes
// with "...". Shared by error messages and the canonical YAML.
std::string escaped(const std::string& s, bool quotes, size_t max) {
    std::string out;
    for (const unsigned char ch : s) {
        if (out.size() >= max) {
            return out + "...";
        }
        if (quotes && (ch == '"' || ch == '\\')) {
            out += '\\';
            out += static_cast<char>(ch);
        } else if (ch == '\n') {
            out += "\\n";
        } else if (ch == '\t') {
            out += "\\t";
        } else if (ch < 0x20 || ch == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\x%02x", ch);
            out += buf;
        } else {
            out += static_cast<char>(ch);
        }
    }
    return out;
}

std::string printable(const std::string& s, size_t max = 80) {
    return escaped(s, false, max);
}

std::string shown(const YAML::Node& n) {
    if (n.IsScalar()) {
        return "\"" + printable(n.Scalar()) + "\"";
    }
    return n.IsSequence() ? "a list" : n.IsMap() ? "a map" : "null";
}

std::string one_of(const std::vector<std::string>& v) {
    std::string s;
    for (const std::string& x : v) {
        s += (s.empty() ? "" : ", ") + x;
    }
    return s;
}

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

// The known key nearest to `key` (within a third of its length), or a name other trainers use for it; "" if none.
std::string nearest(const std::string& key, const std::vector<std::string>& known) {
    static const std::map<std::string, std::string> kOtherNames = {
        {"lr", "learning_rate"},
        {"grad_accum", "gradient_accumulation_steps"},
        {"epochs", "num_epochs"},
        {"num_train_epochs", "num_epochs"},
        {"batch_size", "micro_batch_size"},
        {"per_device_train_batch_size", "micro_batch_size"},
        {"max_seq_len", "sequence_len"},
        {"max_seq_length", "sequence_len"},
        {"model_name_or_path", "base_model"},
        {"optim", "optimizer"},
        {"lr_scheduler_type", "lr_scheduler"},
        {"warmup", "warmup_steps"}};
    const auto other = kOtherNames.find(key);
    if (other != kOtherNames.end() && std::find(known.begin(), known.end(), other->second) != known.end()) {
        return other->second;
    }
    std::string best;
    size_t best_d = std::max<size_t>(1, key.size() / 3) + 1;
    for (const std::string& k : known) {
        const size_t d = edit_distance(key, k);
        if (d < best_d) {
            best_d = d;
            best = k;
        }
    }
    return best;
}

// --------------------------------------------------------------------------------------------------------------
// Where a value came from

// The file and line of a node, or the command-line override that set the key or one of its parents (datasets for
// datasets.0.path). Paths in an override resolve against the working directory, those in the file against its
// directory.
class Source {
  public:
    Source(std::string what, std::string base_dir) : what_(std::move(what)), base_dir_(std::move(base_dir)) {}

    const std::string& what() const { return what_; }
    void set_override(const std::string& key, const std::string& text) { overrides_[key] = text; }

    const std::string* override_of(std::string key) const {
        for (;;) {
            const auto it = overrides_.find(key);
            if (it != overrides_.end()) {
                return &it->second;
            }
            const size_t dot = key.rfind('.');
            if (dot == std::string::npos) {
                return nullptr;
            }
            key.resize(dot);
        }
    }
    std::string line(const YAML::Mark& m) const {
        return m.is_null() || m.line < 0 ? what_ : what_ + ":" + std::to_string(m.line + 1);
    }
    // The message prefix for `key` at node `n`.
    std::string at(const std::string& key, const YAML::Node& n) const {
        const std::string* o = override_of(key);
        return o ? "override '" + printable(*o) + "'" : line(n.Mark());
    }
    // The same, short, for a second location in a message: "line 7" or "override".
    std::string short_at(const std::string& key, const YAML::Node& n) const {
        return override_of(key) || n.Mark().line < 0 ? "override" : "line " + std::to_string(n.Mark().line + 1);
    }
    std::string base_for(const std::string& key) const {
        return override_of(key) ? fs::current_path().string() : base_dir_;
    }

  private:
    std::string what_, base_dir_;
    std::map<std::string, std::string> overrides_; // key path -> override text
};

// The whole of `s` as a number (an optional leading '+' allowed; a double must be finite).
template <typename T> bool parse_number(const std::string& s, T& v) {
    const char* b = s.data();
    const char* e = b + s.size();
    if (b != e && *b == '+') {
        ++b;
    }
    const auto [p, ec] = std::from_chars(b, e, v);
    if (b == e || ec != std::errc() || p != e) {
        return false;
    }
    if constexpr (std::is_floating_point_v<T>) {
        return std::isfinite(v);
    }
    return true;
}

bool to_int(const std::string& s, int64_t& v) {
    return parse_number(s, v);
}
bool to_double(const std::string& s, double& v) {
    return parse_number(s, v);
}

std::string resolve(const std::string& base_dir, const std::string& p) {
    fs::path r = fs::path(p).is_absolute() ? fs::path(p) : fs::path(base_dir) / p;
    r = r.lexically_normal();
    if (!r.has_filename() && r != r.root_path()) { // "dir/" -> "dir", so that equal directories compare equal
        r = r.parent_path();
    }
    return r.string();
}

// --------------------------------------------------------------------------------------------------------------
// One value to read

struct Field {
    const Source& src;
    std::string key; // full path: lora_r, datasets.0.type
    YAML::Node node;
    YAML::Node key_node = {}; // where a null value is reported (yaml-cpp marks it at the next token)

    Field child(const std::string& name, const YAML::Node& n) const { return {src, key + "." + name, n}; }

    [[noreturn]] void fail(const std::string& msg) const {
        const bool null = !node.IsDefined() || node.IsNull();
        throw std::runtime_error(
            src.at(key, null && key_node.Mark().line >= 0 ? key_node : node) + ": key '" + key + "' " + msg
        );
    }
    [[noreturn]] void expected(const std::string& what) const { fail("must be " + what + ", got " + shown(node)); }

    std::string str() const {
        if (!node.IsScalar()) {
            expected("a string");
        }
        return node.Scalar();
    }
    std::string path() const {
        const std::string p = str();
        if (p.empty()) {
            expected("a path");
        }
        return resolve(src.base_for(key), p);
    }
    bool boolean() const {
        bool v = false;
        if (!node.IsScalar() || !YAML::convert<bool>::decode(node, v)) {
            expected("true or false");
        }
        return v;
    }
    int64_t integer(const char* what, bool (*ok)(int64_t)) const {
        int64_t v = 0;
        if (!node.IsScalar() || !to_int(node.Scalar(), v) || !ok(v)) {
            expected(what);
        }
        return v;
    }
    double number(const char* what, bool (*ok)(double)) const {
        double v = 0;
        if (!node.IsScalar() || !to_double(node.Scalar(), v) || !ok(v)) {
            expected(what);
        }
        return v;
    }
    std::string choice(const std::vector<std::string>& allowed) const {
        if (!node.IsScalar() || std::find(allowed.begin(), allowed.end(), node.Scalar()) == allowed.end()) {
            expected("one of " + one_of(allowed));
        }
        return node.Scalar();
    }
};

struct Entry {
    std::string name;
    YAML::Node key, value;
};

// The entries of map node `map` (key path `prefix`, "" at the top level) in order. Refuses keys that are not plain
// scalars, duplicate keys, and unknown keys: all of those in one message, each with its hint.
std::vector<Entry>
entries(const Source& src, const std::string& prefix, const YAML::Node& map, const std::vector<std::string>& known) {
    std::vector<Entry> out;
    std::map<std::string, YAML::Node> first; // key -> its key node
    std::vector<std::pair<std::string, YAML::Node>> unknown;
    for (const auto& kv : map) {
        if (!kv.first.IsScalar()) {
            throw std::runtime_error(
                src.at(prefix, kv.first) + ": keys must be plain names, got " + shown(kv.first) + " as a key"
            );
        }
        const std::string k = kv.first.Scalar();
        const auto [it, fresh] = first.emplace(k, kv.first);
        if (!fresh) {
            throw std::runtime_error(
                src.at(prefix + k, kv.first) + ": key '" + printable(prefix + k) + "' appears twice (first at " +
                src.short_at(prefix + k, it->second) + ")"
            );
        }
        if (std::find(known.begin(), known.end(), k) == known.end()) {
            unknown.emplace_back(k, kv.first);
        } else {
            out.push_back({k, kv.first, kv.second});
        }
    }
    if (unknown.empty()) {
        return out;
    }
    const auto& [k0, n0] = unknown[0];
    const std::string hint0 = nearest(k0, known);
    std::string msg = src.at(prefix + k0, n0) + ": unknown key '" + printable(prefix + k0) + "'" +
                      (hint0.empty() ? "" : "; did you mean '" + hint0 + "'?");
    constexpr size_t kListed = 30;
    for (size_t i = 1; i < unknown.size() && i <= kListed; ++i) {
        const auto& [k, n] = unknown[i];
        const std::string hint = nearest(k, known);
        msg += std::string(i == 1 ? "; also unknown: '" : ", '") + printable(prefix + k) + "' (" +
               src.short_at(prefix + k, n) + (hint.empty() ? "" : "; did you mean '" + hint + "'?") + ")";
    }
    if (unknown.size() > kListed + 1) {
        msg += " and " + std::to_string(unknown.size() - kListed - 1) + " more";
    }
    throw std::runtime_error(msg);
}

// --------------------------------------------------------------------------------------------------------------
// Canonical YAML of values

std::string quote(const std::string& s) {
    std::string out(1, '"');
    out.append(escaped(s, true, std::string::npos));
    out.push_back('"');
    return out;
}

std::string flow(const std::vector<std::string>& items) { // [a, b]
    std::string s = "[";
    for (size_t i = 0; i < items.size(); ++i) {
        s += i ? ", " : "";
        s += items[i];
    }
    s += "]";
    return s;
}
std::string path_or_null(const std::string& s) {
    return s.empty() ? "null" : quote(s);
}
std::string yes_no(bool v) {
    return v ? "true" : "false";
}
std::string num(double v) { // 17 significant digits: exact, and "4" for a whole number
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    return buf;
}

// --------------------------------------------------------------------------------------------------------------
// The keys

struct Key {
    std::string name;
    bool affects_run;                                     // part of run_affecting() and fingerprint()
    std::function<void(const Field&, TrainConfig&)> read; // called when the key is given and not null
    std::function<std::string(const TrainConfig&)> yaml;  // canonical YAML of the resolved value
};

using C = TrainConfig;

Key flag(const char* name, bool affects_run, bool C::*m) {
    return {
        name, affects_run, [m](const Field& f, C& c) { c.*m = f.boolean(); },
        [m](const C& c) {
            return yes_no(c.*m);
        }};
}
Key integer(const char* name, bool affects_run, int64_t C::*m, const char* what, bool (*ok)(int64_t)) {
    return {
        name, affects_run, [=](const Field& f, C& c) { c.*m = f.integer(what, ok); },
        [m](const C& c) {
            return std::to_string(c.*m);
        }};
}
Key number(const char* name, bool affects_run, double C::*m, const char* what, bool (*ok)(double)) {
    return {
        name, affects_run, [=](const Field& f, C& c) { c.*m = f.number(what, ok); },
        [m](const C& c) {
            return num(c.*m);
        }};
}
Key choice(const char* name, bool affects_run, std::string C::*m, std::vector<std::string> allowed) {
    return {
        name, affects_run, [=](const Field& f, C& c) { c.*m = f.choice(allowed); },
        [m](const C& c) {
            return c.*m;
        }};
}
Key path(const char* name, bool affects_run, std::string C::*m) {
    return {
        name, affects_run, [m](const Field& f, C& c) { c.*m = f.path(); },
        [m](const C& c) {
            return path_or_null(c.*m);
        }};
}
Key with_yaml(Key k, std::function<std::string(const C&)> yaml) {
    k.yaml = std::move(yaml);
    return k;
}

bool positive(int64_t v) {
    return v > 0;
}
bool non_negative(int64_t v) {
    return v >= 0;
}
bool positive(double v) {
    return v > 0;
}
bool non_negative(double v) {
    return v >= 0;
}
bool below_one(double v) {
    return v >= 0 && v < 1;
}

bool cpu_has_avx512_bf16() {
    std::ifstream f("/proc/cpuinfo");
    for (std::string line; std::getline(f, line);) {
        if (line.rfind("flags", 0) == 0) {
            return (line + " ").find(" avx512_bf16 ") != std::string::npos;
        }
    }
    return false;
}

void read_target_modules(const Field& f, C& c) {
    std::vector<std::string> allowed = kLinear;
    allowed.push_back("lm_head");
    if (!f.node.IsSequence()) {
        f.expected("a list of module names (" + one_of(allowed) + ")");
    }
    c.lora_target_modules.clear();
    for (const auto& m : f.node) {
        const std::string name = Field{f.src, f.key, m}.choice(allowed);
        if (std::find(c.lora_target_modules.begin(), c.lora_target_modules.end(), name) ==
            c.lora_target_modules.end()) {
            c.lora_target_modules.push_back(name);
        }
    }
}

void read_datasets(const Field& f, C& c) {
    if (!f.node.IsSequence() || f.node.size() == 0) {
        f.expected("a non-empty list of {path, type} entries");
    }
    size_t i = 0;
    for (const auto& item : f.node) {
        const Field e = f.child(std::to_string(i++), item);
        if (!e.node.IsMap()) {
            e.expected("a map with path and type");
        }
        std::map<std::string, Entry> kv;
        for (const Entry& entry : entries(e.src, e.key + ".", e.node, kDatasetKeys)) {
            kv[entry.name] = entry;
        }
        for (const std::string& name : kDatasetKeys) {
            if (!kv.count(name) || kv[name].value.IsNull()) {
                e.fail("needs '" + name + "' (each dataset has a path and a type)");
            }
        }
        const Field path{e.src, e.key + ".path", kv["path"].value, kv["path"].key};
        const Field type{e.src, e.key + ".type", kv["type"].value, kv["type"].key};
        c.datasets.push_back({path.path(), type.choice({"alpaca", "chat", "completion", "text"})});
    }
}

std::string datasets_yaml(const C& c) {
    std::vector<std::string> items;
    for (const Dataset& d : c.datasets) {
        items.push_back("{path: " + quote(d.path) + ", type: " + d.type + "}");
    }
    return flow(items);
}

// A fraction below 1, or a count written as an integer (1.0 is neither: HF's train_test_split refuses it too).
void read_val_set_size(const Field& f, C& c) {
    const char* what = "a fraction in [0, 1) or a whole count of examples";
    int64_t count = 0;
    double fraction = 0;
    if (f.node.IsScalar() && to_int(f.node.Scalar(), count)) {
        if (count < 0) {
            f.expected(what);
        }
        c.val_set_size = static_cast<double>(count);
    } else if (f.node.IsScalar() && to_double(f.node.Scalar(), fraction) && below_one(fraction)) {
        c.val_set_size = fraction;
    } else {
        f.expected(what);
    }
}

void read_bf16(const Field& f, C& c) {
    static const bool kCpuHasBf16 = cpu_has_avx512_bf16();
    bool v = false;
    if (f.node.IsScalar() && f.node.Scalar() == "auto") {
        v = kCpuHasBf16;
    } else if (!f.node.IsScalar() || !YAML::convert<bool>::decode(f.node, v)) {
        f.expected("true, false or auto");
    }
    c.bf16 = v;
}

void read_resume(const Field& f, C& c) {
    const std::string v = f.str();
    c.resume_from_checkpoint = v == "auto" ? v : f.path(); // a directory named auto is ./auto
}

// Every key in config order. The inactive one of the two warmup keys is written as null, since giving both is an
// error.
const std::vector<Key>& keys() {
    static const std::vector<Key> k = {
        path("base_model", true, &C::base_model),
        path("tokenizer", true, &C::tokenizer),
        choice("adapter", true, &C::adapter, {"qlora", "lora", "none"}),
        flag("load_in_4bit", true, &C::load_in_4bit),
        integer("lora_r", true, &C::lora_r, "a positive integer", positive),
        number("lora_alpha", true, &C::lora_alpha, "a number > 0", positive),
        number("lora_dropout", true, &C::lora_dropout, "a number in [0, 1)", below_one),
        {"lora_target_modules", true, read_target_modules,
         [](const C& c) {
             return flow(c.lora_target_modules);
         }},
        flag("lora_target_linear", false, &C::lora_target_linear),
        flag("peft_use_rslora", true, &C::peft_use_rslora),
        path("lora_model_dir", true, &C::lora_model_dir),
        {"datasets", true, read_datasets, datasets_yaml},
        {"val_set_size", true, read_val_set_size,
         [](const C& c) {
             return num(c.val_set_size);
         }},
        flag("shuffle_merged_datasets", true, &C::shuffle_merged_datasets),
        integer("sequence_len", true, &C::sequence_len, "a positive integer", positive),
        flag("sample_packing", true, &C::sample_packing),
        integer("micro_batch_size", true, &C::micro_batch_size, "a positive integer", positive),
        integer("gradient_accumulation_steps", true, &C::gradient_accumulation_steps, "a positive integer", positive),
        number("num_epochs", true, &C::num_epochs, "a number > 0", positive),
        integer(
            "max_steps", true, &C::max_steps, "-1 (derived from num_epochs) or a positive integer",
            [](int64_t v) { return v == -1 || v > 0; }
        ),
        choice(
            "optimizer", true, &C::optimizer, {"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch"}
        ),
        number("adam_beta1", true, &C::adam_beta1, "a number in [0, 1)", below_one),
        number("adam_beta2", true, &C::adam_beta2, "a number in [0, 1)", below_one),
        number("adam_epsilon", true, &C::adam_epsilon, "a number in [0, 1)", below_one),
        choice("lr_scheduler", true, &C::lr_scheduler, {"constant", "linear", "cosine"}),
        number("learning_rate", true, &C::learning_rate, "a number >= 0", non_negative),
        with_yaml(
            integer("warmup_steps", true, &C::warmup_steps, "an integer >= 0", non_negative),
            [](const C& c) { return c.warmup_ratio > 0 ? "null" : std::to_string(c.warmup_steps); }
        ),
        with_yaml(
            number("warmup_ratio", true, &C::warmup_ratio, "a number in [0, 1)", below_one),
            [](const C& c) { return c.warmup_ratio > 0 ? num(c.warmup_ratio) : "null"; }
        ),
        number("weight_decay", true, &C::weight_decay, "a number >= 0", non_negative),
        number("max_grad_norm", true, &C::max_grad_norm, "a number >= 0 (0 disables clipping)", non_negative),
        flag("gradient_checkpointing", true, &C::gradient_checkpointing),
        {"bf16", true, read_bf16,
         [](const C& c) {
             return yes_no(c.bf16);
         }},
        flag("train_on_inputs", true, &C::train_on_inputs),
        integer("seed", true, &C::seed, "an integer >= 0", non_negative),
        integer("logging_steps", false, &C::logging_steps, "a positive integer", positive),
        integer("eval_steps", false, &C::eval_steps, "an integer >= 0 (0: only at the end)", non_negative),
        integer("save_steps", false, &C::save_steps, "an integer >= 0 (0: only at the end)", non_negative),
        integer("save_total_limit", false, &C::save_total_limit, "an integer >= 0 (0: keep all)", non_negative),
        path("output_dir", false, &C::output_dir),
        {"resume_from_checkpoint", false, read_resume,
         [](const C& c) {
             return c.resume_from_checkpoint == "auto" ? c.resume_from_checkpoint
                                                       : path_or_null(c.resume_from_checkpoint);
         }},
        integer("num_threads", false, &C::num_threads, "an integer >= 0 (0: all cores)", non_negative),
    };
    return k;
}

const std::vector<std::string>& key_names() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> v;
        for (const Key& k : keys()) {
            v.push_back(k.name);
        }
        return v;
    }();
    return names;
}

// --------------------------------------------------------------------------------------------------------------
// Overrides

// Applies one "key=value" to the top-level map `top` and records it in `src`.
void apply_override(const std::string& text, std::map<std::string, YAML::Node>& top, Source& src) {
    const std::string at = "override '" + printable(text) + "'";
    const size_t eq = text.find('=');
    if (eq == std::string::npos || eq == 0) {
        throw std::runtime_error(at + ": expected key=value (e.g. lora_r=16 or datasets.0.path=data.jsonl)");
    }
    std::vector<std::string> parts;
    for (size_t b = 0;;) {
        const size_t dot = text.find('.', b);
        parts.push_back(text.substr(b, std::min(dot, eq) - b));
        if (parts.back().empty()) {
            throw std::runtime_error(at + ": empty component in the key");
        }
        if (dot >= eq) {
            break;
        }
        b = dot + 1;
    }
    const std::vector<std::string>& known = key_names();
    if (std::find(known.begin(), known.end(), parts[0]) == known.end()) {
        const std::string hint = nearest(parts[0], known);
        throw std::runtime_error(
            at + ": unknown key '" + printable(parts[0]) + "'" + (hint.empty() ? "" : "; did you mean '" + hint + "'?")
        );
    }
    YAML::Node value;
    try {
        value = YAML::Load(text.substr(eq + 1));
    } catch (const YAML::Exception& e) {
        throw std::runtime_error(at + ": the value is not valid YAML (" + printable(e.msg) + ")");
    }
    // Nodes are replaced, never assigned through: yaml-cpp's assignment rewrites the node itself, and with it every
    // alias of it elsewhere in the file.
    if (parts.size() == 1) {
        top.erase(parts[0]);
        top.emplace(parts[0], value);
        src.set_override(parts[0], text);
        return;
    }
    if (parts[0] != "datasets") {
        throw std::runtime_error(at + ": key '" + parts[0] + "' has no sub-keys");
    }
    const auto list = top.find("datasets");
    if (list == top.end() || !list->second.IsSequence()) {
        throw std::runtime_error(at + ": there is no datasets list to index");
    }
    const size_t n = list->second.size();
    int64_t i = -1;
    const bool digits = std::all_of(parts[1].begin(), parts[1].end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    if (!digits || !to_int(parts[1], i) || i >= static_cast<int64_t>(n)) {
        throw std::runtime_error(
            at + ": '" + printable(parts[1]) + "' is not an index of datasets (0 to " +
            std::to_string(static_cast<int64_t>(n) - 1) + ")"
        );
    }
    const std::string entry_key = "datasets." + std::to_string(i);
    const std::string full = parts.size() > 2 ? entry_key + "." + parts[2] : entry_key;
    if (parts.size() > 2 && std::find(kDatasetKeys.begin(), kDatasetKeys.end(), parts[2]) == kDatasetKeys.end()) {
        const std::string hint = nearest(parts[2], kDatasetKeys);
        throw std::runtime_error(
            at + ": unknown key '" + printable(full) + "'" + (hint.empty() ? "" : "; did you mean '" + hint + "'?")
        );
    }
    if (parts.size() > 3) {
        throw std::runtime_error(at + ": key '" + full + "' has no sub-keys");
    }
    YAML::Node fresh(YAML::NodeType::Sequence);
    for (size_t j = 0; j < n; ++j) {
        const YAML::Node item = list->second[j];
        if (j != static_cast<size_t>(i)) {
            fresh.push_back(item);
        } else if (parts.size() == 2) {
            fresh.push_back(value);
        } else if (!item.IsMap()) {
            throw std::runtime_error(at + ": '" + entry_key + "' is not a map");
        } else {
            YAML::Node entry(YAML::NodeType::Map);
            for (const auto& kv : item) {
                if (!(kv.first.IsScalar() && kv.first.Scalar() == parts[2])) {
                    entry.force_insert(kv.first, kv.second); // force: a duplicate key stays to be reported
                }
            }
            entry.force_insert(parts[2], value);
            fresh.push_back(entry);
        }
    }
    top.erase(list);
    top.emplace("datasets", fresh);
    src.set_override(full, text);
}

} // namespace

// --------------------------------------------------------------------------------------------------------------
// Reading

TrainConfig parse(
    const std::string& text, const std::string& what, const std::string& base_dir,
    const std::vector<std::string>& overrides
) {
    Source src(printable(what, 4096), fs::absolute(fs::path(base_dir)).lexically_normal().string());
    if (text.size() > kMaxConfigBytes) {
        throw std::runtime_error(
            src.what() + ": " + std::to_string(text.size()) + " bytes; a config is at most " +
            std::to_string(kMaxConfigBytes) + " bytes"
        );
    }
    std::vector<YAML::Node> docs;
    try {
        docs = YAML::LoadAll(text);
    } catch (const YAML::Exception& e) {
        throw std::runtime_error(src.line(e.mark) + ": YAML syntax error: " + printable(e.msg));
    }
    if (docs.size() > 1) {
        throw std::runtime_error(
            src.line(docs[1].Mark()) + ": a config is one YAML document; a second one starts here"
        );
    }
    if (docs.empty() || docs[0].IsNull()) {
        throw std::runtime_error(src.what() + ": the config is empty");
    }
    if (!docs[0].IsMap()) {
        throw std::runtime_error(src.line(docs[0].Mark()) + ": expected a map of config keys, got " + shown(docs[0]));
    }
    std::map<std::string, YAML::Node> top, key_nodes; // values by key, and the file's key nodes
    for (const Entry& e : entries(src, "", docs[0], key_names())) {
        top.emplace(e.name, e.value);
        key_nodes.emplace(e.name, e.key);
    }
    for (const std::string& o : overrides) {
        apply_override(o, top, src);
    }

    TrainConfig c;
    std::set<std::string> given;
    for (const Key& k : keys()) {
        const auto it = top.find(k.name);
        if (it != top.end() && !it->second.IsNull()) {
            given.insert(k.name);
            k.read(Field{src, k.name, it->second, key_nodes[k.name]}, c);
        }
    }
    const auto field = [&](const std::string& k) {
        const auto it = top.find(k);
        return Field{src, k, it == top.end() ? YAML::Node() : it->second, key_nodes[k]};
    };
    for (const char* k : {"base_model", "datasets", "output_dir"}) {
        if (!given.count(k)) {
            if (!top.count(k)) {
                throw std::runtime_error(src.what() + ": required key '" + k + "' is missing");
            }
            field(k).fail("is required but has no value");
        }
    }
    if (!given.count("tokenizer")) {
        c.tokenizer = (fs::path(c.base_model) / "tokenizer.model").string();
    }
    if (!given.count("load_in_4bit")) {
        c.load_in_4bit = c.adapter == "qlora";
    } else if (c.adapter == "qlora" && !c.load_in_4bit) {
        field("load_in_4bit").fail("must be true with adapter: qlora (adapter: lora trains LoRA on 16/32-bit weights)");
    } else if (c.adapter != "qlora" && c.load_in_4bit) {
        field("load_in_4bit").fail("is true, which needs adapter: qlora (adapter is " + c.adapter + ")");
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
            src.what() + ": adapter " + c.adapter +
            " has no LoRA targets: set lora_target_linear: true or list lora_target_modules (e.g. [q_proj, v_proj])"
        );
    }
    if (given.count("warmup_steps") && given.count("warmup_ratio")) {
        const Field steps = field("warmup_steps");
        field("warmup_ratio")
            .fail("cannot be given together with warmup_steps (" + src.short_at(steps.key, steps.node) + "); set one");
    }
    return c;
}

TrainConfig load(const std::string& path, const std::vector<std::string>& overrides) {
    const std::string what = printable(path, 4096);
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
        throw std::runtime_error(what + ": is a directory, not a config file");
    }
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        throw std::runtime_error(what + ": cannot open the config file (" + std::strerror(errno) + ")");
    }
    std::string text(kMaxConfigBytes + 1, '\0'); // bounded read, also for a pipe
    f.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<size_t>(f.gcount()));
    if (text.size() > kMaxConfigBytes) {
        throw std::runtime_error(
            what + ": more than " + std::to_string(kMaxConfigBytes) + " bytes; a config is at most that"
        );
    }
    return parse(text, path, fs::absolute(fs::path(path)).parent_path().string(), overrides);
}

// --------------------------------------------------------------------------------------------------------------
// Writing

std::string to_yaml(const TrainConfig& c) {
    std::string y = "# The resolved configuration of this run (every key, absolute paths), written by qlora train.\n";
    for (const Key& k : keys()) {
        y += std::string(k.name) + ": " + k.yaml(c) + "\n";
    }
    return y;
}

std::vector<std::pair<std::string, std::string>> run_affecting(const TrainConfig& c) {
    std::vector<std::pair<std::string, std::string>> out;
    for (const Key& k : keys()) {
        if (k.affects_run) {
            out.emplace_back(k.name, k.yaml(c));
        }
    }
    return out;
}

std::string fingerprint(const TrainConfig& c) {
    uint64_t h = 0xcbf29ce484222325ull; // FNV-1a 64 over "key=value\n" lines
    const auto add = [&h](const std::string& s) {
        for (const unsigned char ch : s) {
            h = (h ^ ch) * 0x100000001b3ull;
        }
    };
    for (const auto& [k, v] : run_affecting(c)) {
        add(k + "=" + v + "\n");
    }
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
    return buf;
}

} // namespace qlora::config
