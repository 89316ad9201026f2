// trainer/src/data.cpp: see qlora/trainer/data.h.
#include "qlora/trainer/data.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include "qlora/trainer/json.h"

namespace qlora::data {

struct Tokenizer::Impl {
    sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& path) {
    Tokenizer t;
    const auto status = t.impl_->sp.Load(path);
    if (!status.ok()) {
        throw std::runtime_error(path + ": cannot load the sentencepiece tokenizer: " + status.ToString());
    }
    if (t.bos_id() < 0 || t.eos_id() < 0) {
        throw std::runtime_error(path + ": the tokenizer defines no BOS or no EOS token");
    }
    return t;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
    std::vector<int> ids;
    const auto status = impl_->sp.Encode(text, &ids);
    if (!status.ok()) {
        throw std::runtime_error("tokenizer: " + status.ToString());
    }
    return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
    std::string out;
    const auto status = impl_->sp.Decode(std::vector<int>(ids.begin(), ids.end()), &out);
    if (!status.ok()) {
        throw std::runtime_error("tokenizer: " + status.ToString());
    }
    return out;
}

std::string Tokenizer::piece(int32_t id) const {
    return impl_->sp.IdToPiece(id);
}
int32_t Tokenizer::bos_id() const {
    return impl_->sp.bos_id();
}
int32_t Tokenizer::eos_id() const {
    return impl_->sp.eos_id();
}
int32_t Tokenizer::pad_id() const {
    return impl_->sp.pad_id();
}
int64_t Tokenizer::vocab_size() const {
    return impl_->sp.GetPieceSize();
}

Format parse_format(const std::string& name) {
    if (name == "alpaca") {
        return Format::kAlpaca;
    }
    if (name == "chat") {
        return Format::kChat;
    }
    if (name == "completion") {
        return Format::kCompletion;
    }
    if (name == "text") {
        return Format::kText;
    }
    throw std::runtime_error("dataset type '" + name + "' is not one of alpaca, chat, completion, text");
}

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
    if (input.empty()) {
        return "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n" +
               instruction + "\n\n### Response:\n";
    }
    return "Below is an instruction that describes a task, paired with an input that provides further context. Write "
           "a response that appropriately completes the request.\n\n### Instruction:\n" +
           instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

namespace {

// Builds an example piece by piece.
struct Builder {
    Example ex;
    void add(const std::vector<int32_t>& ids, bool trained) {
        for (const int32_t id : ids) {
            ex.input_ids.push_back(id);
            ex.labels.push_back(trained && !ex.input_ids.empty() && ex.input_ids.size() > 1 ? id : -100);
        }
    }
    void add(int32_t id, bool trained) { add(std::vector<int32_t>{id}, trained); }
};

std::string
string_field(const nlohmann::json& j, const char* key, bool required, bool non_empty, const std::string& at) {
    if (!j.contains(key) || j[key].is_null()) {
        if (required) {
            throw std::runtime_error(at + ": missing field '" + key + "'");
        }
        return "";
    }
    if (!j[key].is_string()) {
        throw std::runtime_error(at + ": field '" + key + "' must be a string, got " + j[key].dump());
    }
    std::string v = j[key].get<std::string>();
    if (non_empty && v.find_first_not_of(" \t\r\n") == std::string::npos) {
        throw std::runtime_error(at + ": field '" + key + "' is empty");
    }
    return v;
}

Example format_line(
    const nlohmann::json& j, Format format, const Tokenizer& tok, const FormatOptions& opt, const std::string& at
) {
    if (!j.is_object()) {
        throw std::runtime_error(at + ": expected a JSON object");
    }
    const bool inputs = opt.train_on_inputs;
    Builder b;
    switch (format) {
    case Format::kAlpaca: {
        const std::string instruction = string_field(j, "instruction", true, true, at);
        const std::string input = string_field(j, "input", false, false, at);
        const std::string output = string_field(j, "output", true, true, at);
        b.add(tok.bos_id(), false);
        b.add(tok.encode(alpaca_prompt(instruction, input)), inputs);
        b.add(tok.encode(output), true);
        b.add(tok.eos_id(), true);
        break;
    }
    case Format::kCompletion: {
        const std::string prompt = string_field(j, "prompt", true, false, at);
        const std::string completion = string_field(j, "completion", true, true, at);
        b.add(tok.bos_id(), false);
        b.add(tok.encode(prompt), inputs);
        b.add(tok.encode(completion), true);
        b.add(tok.eos_id(), true);
        break;
    }
    case Format::kText: {
        b.add(tok.bos_id(), false);
        b.add(tok.encode(string_field(j, "text", true, true, at)), true);
        b.add(tok.eos_id(), true);
        break;
    }
    case Format::kChat: {
        if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty()) {
            throw std::runtime_error(at + ": field 'messages' must be a non-empty list");
        }
        const auto& msgs = j["messages"];
        std::string system;
        size_t i = 0;
        const auto role_of = [&](size_t k) {
            const auto& m = msgs[k];
            if (!m.is_object()) {
                throw std::runtime_error(at + ": message " + std::to_string(k) + " must be an object");
            }
            const std::string role = string_field(m, "role", true, true, at + ": message " + std::to_string(k));
            if (role != "system" && role != "user" && role != "assistant") {
                throw std::runtime_error(
                    at + ": message " + std::to_string(k) + " has role '" + role + "' (system, user or assistant)"
                );
            }
            return role;
        };
        if (role_of(0) == "system") {
            system = string_field(msgs[0], "content", true, false, at + ": message 0");
            i = 1;
        }
        if (i >= msgs.size()) {
            throw std::runtime_error(at + ": no user/assistant turns");
        }
        bool first = true;
        for (; i < msgs.size(); i += 2) {
            if (role_of(i) != "user") {
                throw std::runtime_error(at + ": message " + std::to_string(i) + " must be from the user");
            }
            if (i + 1 >= msgs.size() || role_of(i + 1) != "assistant") {
                throw std::runtime_error(
                    at + ": message " + std::to_string(i + 1) +
                    " must be the assistant's reply (turns alternate and "
                    "end with the assistant)"
                );
            }
            const std::string user =
                string_field(msgs[i], "content", true, true, at + ": message " + std::to_string(i));
            const std::string reply =
                string_field(msgs[i + 1], "content", true, true, at + ": message " + std::to_string(i + 1));
            b.add(tok.bos_id(), inputs);
            b.add(tok.encode(chat_user_text(system, user, first)), inputs);
            b.add(tok.encode(" " + reply), true);
            b.add(tok.eos_id(), true);
            first = false;
        }
        break;
    }
    }
    return b.ex;
}

} // namespace

std::string chat_user_text(const std::string& system, const std::string& user, bool first_turn) {
    const std::string sys_block = first_turn && !system.empty() ? "<<SYS>>\n" + system + "\n<</SYS>>\n\n" : "";
    return "[INST] " + sys_block + user + " [/INST]";
}

std::vector<int64_t> chat_prompt_ids(
    const Tokenizer& tok, const std::string& system, const std::vector<std::pair<std::string, std::string>>& turns,
    const std::string& next_user
) {
    std::vector<int64_t> ids;
    const auto add = [&](const std::vector<int32_t>& v) {
        ids.insert(ids.end(), v.begin(), v.end());
    };
    bool first = true;
    for (const auto& [user, reply] : turns) {
        ids.push_back(tok.bos_id());
        add(tok.encode(chat_user_text(system, user, first)));
        add(tok.encode(" " + reply));
        ids.push_back(tok.eos_id());
        first = false;
    }
    ids.push_back(tok.bos_id());
    add(tok.encode(chat_user_text(system, next_user, first)));
    return ids;
}

std::vector<Example> load_jsonl(
    const std::string& path, Format format, const Tokenizer& tok, const FormatOptions& opt, DatasetStats* stats
) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        throw std::runtime_error(path + ": cannot open the dataset");
    }
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string text = ss.str();
    DatasetStats st;
    std::vector<Example> out;
    size_t start = 0;
    int64_t line_no = 0;
    while (start < text.size()) {
        size_t end = text.find('\n', start);
        if (end == std::string::npos) {
            end = text.size();
        }
        std::string line = text.substr(start, end - start);
        start = end + 1;
        ++line_no;
        if (!line.empty() && line.back() == '\r') {
            line.pop_back();
        }
        const std::string at = path + ":" + std::to_string(line_no);
        if (line.find_first_not_of(" \t") == std::string::npos) {
            throw std::runtime_error(at + ": blank line (one JSON object per line)");
        }
        Example ex = format_line(qlora::trainer::parse_json_strict(line, at), format, tok, opt, at);
        ++st.lines;
        if (static_cast<int64_t>(ex.input_ids.size()) > opt.sequence_len) {
            ex.input_ids.resize(static_cast<size_t>(opt.sequence_len));
            ex.labels.resize(static_cast<size_t>(opt.sequence_len));
            ++st.truncated;
        }
        int64_t trained = 0;
        for (const int32_t l : ex.labels) {
            trained += l != -100;
        }
        if (trained == 0) {
            ++st.no_target;
            continue;
        }
        ++st.examples;
        st.tokens += static_cast<int64_t>(ex.input_ids.size());
        st.trained_tokens += trained;
        for (auto it = ex.labels.rbegin(); it != ex.labels.rend(); ++it) {
            if (*it != -100) {
                st.ending_in_eos += *it == tok.eos_id() && it == ex.labels.rbegin();
                break;
            }
        }
        out.push_back(std::move(ex));
    }
    if (stats != nullptr) {
        *stats = st;
    }
    return out;
}

std::vector<std::vector<int64_t>> pack(const std::vector<Example>& ex, const std::vector<int64_t>& order, int64_t T) {
    std::vector<std::vector<int64_t>> rows;
    int64_t used = T + 1;
    for (const int64_t i : order) {
        const auto n = static_cast<int64_t>(ex[static_cast<size_t>(i)].input_ids.size());
        if (used + n > T) {
            rows.emplace_back();
            used = 0;
        }
        rows.back().push_back(i);
        used += n;
    }
    return rows;
}

std::vector<std::vector<int64_t>> unpacked(const std::vector<int64_t>& order) {
    std::vector<std::vector<int64_t>> rows;
    rows.reserve(order.size());
    for (const int64_t i : order) {
        rows.push_back({i});
    }
    return rows;
}

Batch collate(
    const std::vector<Example>& ex, const std::vector<std::vector<int64_t>>& rows, int64_t T, int32_t pad_id
) {
    const auto R = static_cast<int64_t>(rows.size());
    Batch b;
    b.input_ids = at::full({R, T}, pad_id, at::kLong);
    b.labels = at::full({R, T}, -100, at::kLong);
    b.position_ids = at::zeros({R, T}, at::kLong);
    b.segment_ids = at::zeros({R, T}, at::kLong);
    auto ids = b.input_ids.accessor<int64_t, 2>();
    auto labels = b.labels.accessor<int64_t, 2>();
    auto pos = b.position_ids.accessor<int64_t, 2>();
    auto seg = b.segment_ids.accessor<int64_t, 2>();
    for (int64_t r = 0; r < R; ++r) {
        int64_t t = 0, s = 0;
        for (const int64_t i : rows[static_cast<size_t>(r)]) {
            const Example& e = ex[static_cast<size_t>(i)];
            ++s;
            TORCH_CHECK(t + static_cast<int64_t>(e.input_ids.size()) <= T, "collate: a row is longer than ", T);
            for (size_t k = 0; k < e.input_ids.size(); ++k, ++t) {
                ids[r][t] = e.input_ids[k];
                labels[r][t] = e.labels[k];
                pos[r][t] = static_cast<int64_t>(k);
                seg[r][t] = s;
                b.trained_tokens += e.labels[k] != -100;
            }
        }
        b.tokens += t;
    }
    return b;
}

std::string render_debug(const Example& ex, const Tokenizer& tok) {
    std::string out;
    char buf[64];
    for (size_t k = 0; k < ex.input_ids.size(); ++k) {
        std::snprintf(buf, sizeof(buf), "%5zu %6d ", k, ex.input_ids[k]);
        std::string p = tok.piece(ex.input_ids[k]);
        for (size_t q = 0; (q = p.find('\n', q)) != std::string::npos;) {
            p.replace(q, 1, "\\n");
        }
        out += buf + ("'" + p + "'");
        out += ex.labels[k] == -100 ? "  [masked]\n" : "  -> " + std::to_string(ex.labels[k]) + "\n";
    }
    return out;
}

} // namespace qlora::data
