// tests/cpp/trainer/test_config.cpp: the YAML config of `qlora train` (qlora/trainer/config.h): axolotl keys and
// defaults, strict errors naming file, line and key (with "did you mean"), overrides, path resolution, the resolved
// YAML round trip and the run fingerprint.
#include <gtest/gtest.h>

#include "qlora/trainer/config.h"

namespace {

using qlora::config::parse;
using qlora::config::TrainConfig;

const char* kBase = R"(base_model: models/llama
datasets:
  - path: data/a.jsonl
    type: alpaca
output_dir: out
lora_target_linear: true
)";

TrainConfig ok(const std::string& extra, const std::vector<std::string>& overrides = {}) {
    return parse(std::string(kBase) + extra, "c.yaml", "/cfg", overrides);
}

std::string error(const std::string& text, const std::vector<std::string>& overrides = {}) {
    try {
        parse(text, "c.yaml", "/cfg", overrides);
    } catch (const std::runtime_error& e) {
        const std::string msg = e.what();
        EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
        return msg;
    }
    ADD_FAILURE() << "accepted:\n" << text;
    return "";
}

TEST(ConfigTest, DefaultsAndPathResolution) {
    const TrainConfig c = ok("");
    EXPECT_EQ(c.base_model, "/cfg/models/llama");
    EXPECT_EQ(c.tokenizer, "/cfg/models/llama/tokenizer.model");
    EXPECT_EQ(c.datasets.at(0).path, "/cfg/data/a.jsonl");
    EXPECT_EQ(c.output_dir, "/cfg/out");
    EXPECT_EQ(c.adapter, "qlora");
    EXPECT_TRUE(c.load_in_4bit);
    EXPECT_EQ(c.lora_target_modules.size(), 7u);
    EXPECT_EQ(c.optimizer, "paged_adamw_8bit");
    EXPECT_EQ(c.lr_scheduler, "cosine");
    EXPECT_DOUBLE_EQ(c.learning_rate, 2e-4);
    EXPECT_EQ(c.sequence_len, 2048);
    EXPECT_EQ(c.resume_from_checkpoint, "");
}

TEST(ConfigTest, AxolotlKeysParse) {
    const TrainConfig c = ok(R"(tokenizer: /abs/tok.model
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
sequence_len: 1024
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 3
optimizer: adamw_torch
lr_scheduler: linear
learning_rate: 0.0001
warmup_ratio: 0.1
weight_decay: 0.01
max_grad_norm: 0.5
gradient_checkpointing: true
bf16: false
train_on_inputs: true
seed: 7
val_set_size: 0.05
save_steps: 10
save_total_limit: 3
resume_from_checkpoint: auto
)");
    EXPECT_EQ(c.tokenizer, "/abs/tok.model");
    EXPECT_EQ(c.lora_r, 32);
    EXPECT_DOUBLE_EQ(c.lora_alpha, 64);
    EXPECT_TRUE(c.sample_packing);
    EXPECT_EQ(c.gradient_accumulation_steps, 4);
    EXPECT_EQ(c.optimizer, "adamw_torch");
    EXPECT_DOUBLE_EQ(c.warmup_ratio, 0.1);
    EXPECT_TRUE(c.gradient_checkpointing);
    EXPECT_TRUE(c.train_on_inputs);
    EXPECT_EQ(c.resume_from_checkpoint, "auto");
}

TEST(ConfigTest, ErrorsNameFileLineAndKey) {
    const std::string b = kBase;
    EXPECT_NE(
        error(b + "learnig_rate: 0.1\n").find("c.yaml:7: unknown key 'learnig_rate'; did you mean 'learning_rate'?"),
        std::string::npos
    );
    EXPECT_NE(
        error(b + "lora_r: abc\n").find("c.yaml:7: key 'lora_r' must be a positive integer, got \"abc\""),
        std::string::npos
    );
    EXPECT_NE(error(b + "lora_r: -3\n").find("c.yaml:7: key 'lora_r'"), std::string::npos);
    EXPECT_NE(
        error(b + "lora_dropout: 1.0\n").find("key 'lora_dropout' must be a number in [0, 1)"), std::string::npos
    );
    EXPECT_NE(
        error(b + "sample_packing: [1]\n").find("c.yaml:7: key 'sample_packing' must be true or false, got a list"),
        std::string::npos
    );
    EXPECT_NE(
        error(b + "optimizer: sgd\n")
            .find("must be one of paged_adamw_8bit, adamw_8bit, paged_adamw_32bit, adamw_torch"),
        std::string::npos
    );
    EXPECT_NE(error(b + "seed: 1\nseed: 2\n").find("c.yaml:8: key 'seed' appears twice"), std::string::npos);
    EXPECT_NE(
        error(b + "warmup_steps: 3\nwarmup_ratio: 0.1\n").find("warmup_ratio' cannot be given together"),
        std::string::npos
    );
    EXPECT_NE(
        error(b + "load_in_4bit: false\n").find("key 'load_in_4bit' must be true with adapter: qlora"),
        std::string::npos
    );
    EXPECT_NE(error(b + "foo: [unclosed\n").find("c.yaml:"), std::string::npos);
    EXPECT_NE(error("datasets: []\noutput_dir: o\n").find("required key 'base_model' is missing"), std::string::npos);
    EXPECT_NE(
        error("base_model: m\noutput_dir: o\nlora_target_linear: true\ndatasets:\n  - path: a\n    typ: text\n")
            .find("c.yaml:6: key 'datasets' entry has unknown key 'typ'; did you mean 'type'?"),
        std::string::npos
    );
    EXPECT_NE(
        error("base_model: m\noutput_dir: o\ndatasets:\n  - path: a\n    type: text\n").find("no LoRA targets"),
        std::string::npos
    );
}

TEST(ConfigTest, Overrides) {
    const TrainConfig c =
        ok("", {"lora_r=16", "datasets.0.path=b.jsonl", "lora_target_modules=[q_proj, v_proj]",
                "lora_target_linear=false"});
    EXPECT_EQ(c.lora_r, 16);
    EXPECT_EQ(c.datasets[0].path, "/cfg/b.jsonl");
    EXPECT_EQ(c.lora_target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
    EXPECT_NE(
        error(kBase, {"lora_rank=4"}).find("override 'lora_rank=4': unknown key 'lora_rank'; did you mean 'lora_r'?"),
        std::string::npos
    );
    EXPECT_NE(error(kBase, {"lora_r"}).find("override 'lora_r': expected key=value"), std::string::npos);
    EXPECT_NE(
        error(kBase, {"lora_r=x"}).find("override 'lora_r=x': key 'lora_r' must be a positive integer"),
        std::string::npos
    );
    EXPECT_NE(error(kBase, {"datasets.3.path=x"}).find("'3' is not an index of the list"), std::string::npos);
}

TEST(ConfigTest, ResolvedYamlRoundTripsAndFingerprint) {
    const TrainConfig c = ok("lora_r: 4\nsample_packing: true\nresume_from_checkpoint: ckpt\nwarmup_steps: 5\n");
    const TrainConfig back = parse(qlora::config::to_yaml(c), "resolved.yaml", "/elsewhere");
    EXPECT_EQ(back, c);
    const std::string f = qlora::config::fingerprint(c);
    EXPECT_EQ(f.size(), 16u);
    EXPECT_EQ(
        qlora::config::fingerprint(ok("lora_r: 4\nsample_packing: true\nwarmup_steps: 5\nlogging_steps: 9\n")), f
    );
    EXPECT_NE(qlora::config::fingerprint(ok("lora_r: 4\nsample_packing: true\nwarmup_steps: 6\n")), f);
}

} // namespace

namespace {

TEST(ConfigTest, BundledConfigsParse) {
    for (const char* name :
         {"tiny/qlora.yaml", "tiny/pretrain.yaml", "llama-2-7b-qlora.yaml", "llama-3-8b-qlora.yaml"}) {
        EXPECT_NO_THROW(qlora::config::load(std::string(QLORA_SOURCE_DIR "/configs/") + name)) << name;
    }
}

} // namespace
