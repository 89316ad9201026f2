// qlora/trainer/data.h: the training data pipeline: a sentencepiece tokenizer, JSONL datasets in four formats turned
// into examples (token ids and labels), sample packing and batch collation.
//
// Example layout (labels aligned with input_ids, Hugging Face's convention: the model shifts them; -100 = not
// trained): BOS + prompt tokens + response tokens + EOS, with BOS and EOS inserted as ids (never by encoding "<s>").
// The prompt and the response are encoded as separate strings and concatenated, so the boundary of the mask is
// exact. Trained: the response and its EOS (and the prompt too with train_on_inputs; never the first token).
//   alpaca      {"instruction", "input" (optional), "output"}: the Stanford Alpaca prompt template (alpaca_prompt)
//   completion  {"prompt", "completion"}
//   text        {"text"}: everything after BOS is trained
//   chat        {"messages": [{"role": "system"|"user"|"assistant", "content"}]}: Llama 2 chat: an optional leading
//               system message, then user/assistant turns alternating, starting with user and ending with assistant;
//               each pair is BOS + encode("[INST] " + [system block on the first pair] + user + " [/INST]") +
//               encode(" " + assistant) + EOS, with the system block "<<SYS>>\n" + system + "\n<</SYS>>\n\n".
//               Trained: each assistant's tokens and the EOS after them.
// A bad line (invalid JSON, a missing or mistyped field, an empty response, a blank line, wrong turn order) throws
// `<file>:<line>: <problem>`; nothing is skipped silently. Examples longer than sequence_len keep their first
// sequence_len tokens (counted as truncated); one left with no trained token is dropped and counted (no_target).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <utility>

#include <ATen/core/Tensor.h>

namespace qlora::data {

class Tokenizer {
  public:
    static Tokenizer load(const std::string& path);
    ~Tokenizer();
    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;

    std::vector<int32_t> encode(const std::string& text) const; // no BOS/EOS
    std::string decode(const std::vector<int32_t>& ids) const;
    std::string piece(int32_t id) const;
    int32_t bos_id() const;
    int32_t eos_id() const;
    int32_t pad_id() const; // -1 when the model has none
    int64_t vocab_size() const;

  private:
    Tokenizer();
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

enum class Format { kAlpaca, kChat, kCompletion, kText };
Format parse_format(const std::string& name);

// The Stanford Alpaca prompt for an instruction and an optional input (ends with "### Response:\n").
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

// Llama 2 chat: the text of a user turn, "[INST] " + (on the first turn, with a system prompt) "<<SYS>>\n" + system +
// "\n<</SYS>>\n\n" + user + " [/INST]". Training (format chat) and `qlora generate --chat` both use it.
std::string chat_user_text(const std::string& system, const std::string& user, bool first_turn);

// The prompt ids of a conversation so far: for each finished (user, reply) pair BOS + encode(chat_user_text) +
// encode(" " + reply) + EOS, then BOS + encode(chat_user_text(next_user)), as the model was trained (format chat).
std::vector<int64_t> chat_prompt_ids(
    const Tokenizer& tok, const std::string& system, const std::vector<std::pair<std::string, std::string>>& turns,
    const std::string& next_user
);

struct Example {
    std::vector<int32_t> input_ids;
    std::vector<int32_t> labels;
};

struct FormatOptions {
    int64_t sequence_len = 2048;
    bool train_on_inputs = false;
};

struct DatasetStats {
    int64_t lines = 0, examples = 0, truncated = 0, no_target = 0, ending_in_eos = 0, tokens = 0, trained_tokens = 0;
};

std::vector<Example>
load_jsonl(const std::string& path, Format format, const Tokenizer& tok, const FormatOptions& opt, DatasetStats* stats);

// Rows of example indexes: greedy packing in the given order (the next example joins the current row when it fits in
// sequence_len, else starts a new one), or one example per row.
std::vector<std::vector<int64_t>> pack(const std::vector<Example>& ex, const std::vector<int64_t>& order, int64_t T);
std::vector<std::vector<int64_t>> unpacked(const std::vector<int64_t>& order);

// int64 [rows, T] tensors. Right padding with pad_id (callers pass EOS when the tokenizer has no pad), label -100,
// position 0, segment 0; real tokens: positions restart at 0 for each example, segments 1, 2, ... within a row.
// Masks come from lengths, never from ids, so a real EOS equal to the pad id stays trained.
struct Batch {
    at::Tensor input_ids, labels, position_ids, segment_ids;
    int64_t tokens = 0, trained_tokens = 0;
};
Batch collate(const std::vector<Example>& ex, const std::vector<std::vector<int64_t>>& rows, int64_t T, int32_t pad_id);

// One line per token: position, id, piece, and the label or "[masked]" (qlora preprocess --debug).
std::string render_debug(const Example& ex, const Tokenizer& tok);

} // namespace qlora::data
