// tests/cpp/trainer/test_config.cpp: the YAML config of `qlora train` (qlora/trainer/config.h), read from files in a
// per-test directory: axolotl keys and defaults, strict one-line errors naming the file, the line and the key
// (reliability-tests.md §2: Y1 bounded input, Y2 unknown keys, types, ranges, duplicates), overrides, path
// resolution, the resolved YAML round trip and the run fingerprint.
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "qlora/trainer/config.h"

namespace {

namespace fs = std::filesystem;
using qlora::config::TrainConfig;

// The smallest valid config, five lines: a line appended to it is line 6.
const std::string kMinimal = "base_model: models/llama\n"
                             "datasets:\n"
                             "  - {path: data/a.jsonl, type: alpaca}\n"
                             "output_dir: out\n"
                             "lora_target_linear: true\n";

const std::vector<std::string> kLinear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// Every key, in the order of to_yaml.
const std::vector<std::string> kAllKeys = {
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

// Every key away from its default (warmup_steps excepted: it excludes warmup_ratio).
const std::string kEveryKey = R"(base_model: models/llama
tokenizer: tok/sp.model
adapter: lora
load_in_4bit: false
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj, lm_head, q_proj]
lora_target_linear: false
peft_use_rslora: true
lora_model_dir: adapters/start
datasets:
  - path: data/a.jsonl
    type: chat
  - path: /abs/b.jsonl
    type: completion
val_set_size: 10
shuffle_merged_datasets: false
sequence_len: 512
sample_packing: true
micro_batch_size: 4
gradient_accumulation_steps: 8
num_epochs: 2.5
max_steps: 100
optimizer: adamw_torch
adam_beta1: 0.8
adam_beta2: 0.95
adam_epsilon: 1.0e-6
lr_scheduler: linear
learning_rate: 1.0e-4
warmup_ratio: 0.1
weight_decay: 0.01
max_grad_norm: 0.3
gradient_checkpointing: true
bf16: true
train_on_inputs: true
seed: 7
logging_steps: 5
eval_steps: 50
save_steps: 100
save_total_limit: 3
output_dir: runs/x
resume_from_checkpoint: runs/x/checkpoint-10
num_threads: 2
)";

class ConfigTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() / ("qlora-config-" + std::to_string(getpid()) + "-" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
        file_ = (dir_ / "c.yaml").string();
    }
    void TearDown() override { fs::remove_all(dir_); }

    std::string write(const std::string& text, const fs::path& name = "c.yaml") {
        const fs::path p = dir_ / name;
        fs::create_directories(p.parent_path());
        std::ofstream(p, std::ios::binary) << text;
        return p.string();
    }
    std::string in_dir(const std::string& rel) const { return (dir_ / rel).lexically_normal().string(); }
    TrainConfig load(const std::string& text, const std::vector<std::string>& overrides = {}) {
        return qlora::config::load(write(text), overrides);
    }
    // The error of loading `text`; every error must be one line.
    std::string error(const std::string& text, const std::vector<std::string>& overrides = {}) {
        try {
            load(text, overrides);
        } catch (const std::runtime_error& e) {
            const std::string msg = e.what();
            EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
            return msg;
        }
        ADD_FAILURE() << "accepted:\n" << text;
        return "";
    }

    fs::path dir_;
    std::string file_; // the path of c.yaml, which starts every message about it
};

TEST_F(ConfigTest, Defaults) {
    const TrainConfig c = load(kMinimal);
    EXPECT_EQ(c.base_model, in_dir("models/llama"));
    EXPECT_EQ(c.tokenizer, in_dir("models/llama/tokenizer.model"));
    EXPECT_EQ(c.adapter, "qlora");
    EXPECT_TRUE(c.load_in_4bit);
    EXPECT_EQ(c.lora_r, 8);
    EXPECT_EQ(c.lora_alpha, 16.0);
    EXPECT_EQ(c.lora_dropout, 0.0);
    EXPECT_EQ(c.lora_target_modules, kLinear);
    EXPECT_TRUE(c.lora_target_linear);
    EXPECT_FALSE(c.peft_use_rslora);
    EXPECT_EQ(c.lora_model_dir, "");
    ASSERT_EQ(c.datasets.size(), 1u);
    EXPECT_EQ(c.datasets[0], (qlora::config::Dataset{in_dir("data/a.jsonl"), "alpaca"}));
    EXPECT_EQ(c.val_set_size, 0.0);
    EXPECT_TRUE(c.shuffle_merged_datasets);
    EXPECT_EQ(c.sequence_len, 2048);
    EXPECT_FALSE(c.sample_packing);
    EXPECT_EQ(c.micro_batch_size, 1);
    EXPECT_EQ(c.gradient_accumulation_steps, 1);
    EXPECT_EQ(c.num_epochs, 1.0);
    EXPECT_EQ(c.max_steps, -1);
    EXPECT_EQ(c.optimizer, "paged_adamw_8bit");
    EXPECT_EQ(c.adam_beta1, 0.9);
    EXPECT_EQ(c.adam_beta2, 0.999);
    EXPECT_EQ(c.adam_epsilon, 1e-8);
    EXPECT_EQ(c.lr_scheduler, "cosine");
    EXPECT_EQ(c.learning_rate, 2e-4);
    EXPECT_EQ(c.warmup_steps, 0);
    EXPECT_EQ(c.warmup_ratio, 0.0);
    EXPECT_EQ(c.weight_decay, 0.0);
    EXPECT_EQ(c.max_grad_norm, 1.0);
    EXPECT_FALSE(c.gradient_checkpointing);
    EXPECT_FALSE(c.bf16);
    EXPECT_FALSE(c.train_on_inputs);
    EXPECT_EQ(c.seed, 42);
    EXPECT_EQ(c.logging_steps, 1);
    EXPECT_EQ(c.eval_steps, 0);
    EXPECT_EQ(c.save_steps, 0);
    EXPECT_EQ(c.save_total_limit, 0);
    EXPECT_EQ(c.output_dir, in_dir("out"));
    EXPECT_EQ(c.resume_from_checkpoint, "");
    EXPECT_EQ(c.num_threads, 0);
}

TEST_F(ConfigTest, EveryKeyIsRead) {
    const TrainConfig c = load(kEveryKey);
    EXPECT_EQ(c.base_model, in_dir("models/llama"));
    EXPECT_EQ(c.tokenizer, in_dir("tok/sp.model"));
    EXPECT_EQ(c.adapter, "lora");
    EXPECT_FALSE(c.load_in_4bit);
    EXPECT_EQ(c.lora_r, 32);
    EXPECT_EQ(c.lora_alpha, 64.0);
    EXPECT_EQ(c.lora_dropout, 0.05);
    EXPECT_EQ(c.lora_target_modules, (std::vector<std::string>{"q_proj", "v_proj", "lm_head"})); // deduplicated
    EXPECT_FALSE(c.lora_target_linear);
    EXPECT_TRUE(c.peft_use_rslora);
    EXPECT_EQ(c.lora_model_dir, in_dir("adapters/start"));
    EXPECT_EQ(
        c.datasets,
        (std::vector<qlora::config::Dataset>{{in_dir("data/a.jsonl"), "chat"}, {"/abs/b.jsonl", "completion"}})
    );
    EXPECT_EQ(c.val_set_size, 10.0);
    EXPECT_FALSE(c.shuffle_merged_datasets);
    EXPECT_EQ(c.sequence_len, 512);
    EXPECT_TRUE(c.sample_packing);
    EXPECT_EQ(c.micro_batch_size, 4);
    EXPECT_EQ(c.gradient_accumulation_steps, 8);
    EXPECT_EQ(c.num_epochs, 2.5);
    EXPECT_EQ(c.max_steps, 100);
    EXPECT_EQ(c.optimizer, "adamw_torch");
    EXPECT_EQ(c.adam_beta1, 0.8);
    EXPECT_EQ(c.adam_beta2, 0.95);
    EXPECT_EQ(c.adam_epsilon, 1e-6);
    EXPECT_EQ(c.lr_scheduler, "linear");
    EXPECT_EQ(c.learning_rate, 1e-4);
    EXPECT_EQ(c.warmup_steps, 0);
    EXPECT_EQ(c.warmup_ratio, 0.1);
    EXPECT_EQ(c.weight_decay, 0.01);
    EXPECT_EQ(c.max_grad_norm, 0.3);
    EXPECT_TRUE(c.gradient_checkpointing);
    EXPECT_TRUE(c.bf16);
    EXPECT_TRUE(c.train_on_inputs);
    EXPECT_EQ(c.seed, 7);
    EXPECT_EQ(c.logging_steps, 5);
    EXPECT_EQ(c.eval_steps, 50);
    EXPECT_EQ(c.save_steps, 100);
    EXPECT_EQ(c.save_total_limit, 3);
    EXPECT_EQ(c.output_dir, in_dir("runs/x"));
    EXPECT_EQ(c.resume_from_checkpoint, in_dir("runs/x/checkpoint-10"));
    EXPECT_EQ(c.num_threads, 2);

    const TrainConfig s = load(kMinimal + "warmup_steps: 25\nval_set_size: 0.05\nresume_from_checkpoint: auto\n");
    EXPECT_EQ(s.warmup_steps, 25);
    EXPECT_EQ(s.val_set_size, 0.05);
    EXPECT_EQ(s.resume_from_checkpoint, "auto");
    // YAML 1.1 booleans (PyYAML, hence axolotl) and a quoted number read as their values.
    const TrainConfig y = load(kMinimal + "sample_packing: yes\ntrain_on_inputs: off\nlora_r: \"16\"\n");
    EXPECT_TRUE(y.sample_packing);
    EXPECT_FALSE(y.train_on_inputs);
    EXPECT_EQ(y.lora_r, 16);
}

TEST_F(ConfigTest, AxolotlStyleConfigLoads) {
    // The layout of axolotl's examples/*/qlora.yml, keeping only options qlora has; empty keys are unset.
    const TrainConfig c = load(R"(base_model: ./llama-2-7b

load_in_4bit: true

datasets:
  - path: data/alpaca_2k.jsonl
    type: alpaca
val_set_size: 0.05
output_dir: ./qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
bf16: auto

gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1

warmup_steps: 10
weight_decay: 0.0
)");
    EXPECT_EQ(c.base_model, in_dir("llama-2-7b"));
    EXPECT_EQ(c.output_dir, in_dir("qlora-out"));
    EXPECT_EQ(c.lora_model_dir, "");
    EXPECT_EQ(c.resume_from_checkpoint, "");
    EXPECT_EQ(c.lora_target_modules, kLinear);
    EXPECT_EQ(c.optimizer, "paged_adamw_32bit");
    EXPECT_EQ(c.lora_r, 32);
    EXPECT_EQ(c.sequence_len, 4096);
    EXPECT_EQ(c.warmup_steps, 10);
    EXPECT_EQ(c.learning_rate, 2e-4);
}

TEST_F(ConfigTest, JsonIsYaml) {
    // tests/python write their configs as JSON on one line.
    const TrainConfig c =
        load(R"({"base_model": "/m", "lora_target_linear": true, "datasets": [{"path": "d.jsonl", "type": "alpaca"}],)"
             R"( "val_set_size": 4, "learning_rate": 5e-3, "lora_dropout": 0.0, "output_dir": "/o"})");
    EXPECT_EQ(c.datasets[0].path, in_dir("d.jsonl"));
    EXPECT_EQ(c.val_set_size, 4.0);
    EXPECT_EQ(c.learning_rate, 5e-3);
    EXPECT_EQ(
        error(R"({"base_model": "/m", "lora_rank": 4})"), file_ + ":1: unknown key 'lora_rank'; did you mean 'lora_r'?"
    );
}

TEST_F(ConfigTest, Y2_AllUnknownKeysOfACopiedAxolotlConfigInOneMessage) {
    // axolotl options qlora does not have, and one typo: one message lists them all, hints only where one is near.
    EXPECT_EQ(
        error("base_model: m\nmodel_type: LlamaForCausalLM\ntokenizer_type: LlamaTokenizer\nstrict: false\n"
              "datasets:\n  - {path: a.jsonl, type: alpaca}\noutput_dir: o\nlora_target_linear: true\n"
              "lora_droput: 0.05\nflash_attention: true\nwandb_project:\nsaves_per_epoch: 1\n"),
        file_ + ":2: unknown key 'model_type'; also unknown: 'tokenizer_type' (line 3), 'strict' (line 4), "
                "'lora_droput' (line 9; did you mean 'lora_dropout'?), 'flash_attention' (line 10), 'wandb_project' "
                "(line 11), 'saves_per_epoch' (line 12)"
    );
}

TEST_F(ConfigTest, Y2_UnknownKeyWithDidYouMean) {
    EXPECT_EQ(
        error(kMinimal + "learnig_rate: 0.1\n"), file_ + ":6: unknown key 'learnig_rate'; did you mean 'learning_rate'?"
    );
    EXPECT_EQ(error(kMinimal + "lora_rank: 4\n"), file_ + ":6: unknown key 'lora_rank'; did you mean 'lora_r'?");
    EXPECT_EQ(error(kMinimal + "lr: 0.1\n"), file_ + ":6: unknown key 'lr'; did you mean 'learning_rate'?");
    EXPECT_EQ(
        error(kMinimal + "grad_accum: 0\n"),
        file_ + ":6: unknown key 'grad_accum'; did you mean 'gradient_accumulation_steps'?"
    );
    EXPECT_EQ(error(kMinimal + "foo: 1\n"), file_ + ":6: unknown key 'foo'");
    EXPECT_EQ(error("[a, b]: 1\n" + kMinimal), file_ + ":1: keys must be plain names, got a list as a key");
}

TEST_F(ConfigTest, Y2_DatasetEntriesAreStrict) {
    const std::string head = "base_model: m\noutput_dir: o\nlora_target_linear: true\ndatasets:\n";
    EXPECT_EQ(
        error(head + "  - path: a.jsonl\n    type: text\n  - path: b.jsonl\n    typ: alpaca\n"),
        file_ + ":8: unknown key 'datasets.1.typ'; did you mean 'type'?"
    );
    EXPECT_EQ(
        error(head + "  - path: a.jsonl\n    type: json\n"),
        file_ + ":6: key 'datasets.0.type' must be one of alpaca, chat, completion, text, got \"json\""
    );
    EXPECT_EQ(
        error(head + "  - path: a.jsonl\n    type: text\n    path: b.jsonl\n"),
        file_ + ":7: key 'datasets.0.path' appears twice (first at line 5)"
    );
    EXPECT_EQ(
        error(head + "  - path: a.jsonl\n"),
        file_ + ":5: key 'datasets.0' needs 'type' (each dataset has a path and a type)"
    );
    EXPECT_EQ(
        error(head + "  - a.jsonl\n"), file_ + ":5: key 'datasets.0' must be a map with path and type, got \"a.jsonl\""
    );
    EXPECT_EQ(
        error(head + "  - {path: [a], type: text}\n"), file_ + ":5: key 'datasets.0.path' must be a string, got a list"
    );
    EXPECT_EQ(
        error("base_model: m\noutput_dir: o\nlora_target_linear: true\ndatasets: []\n"),
        file_ + ":4: key 'datasets' must be a non-empty list of {path, type} entries, got a list"
    );
}

TEST_F(ConfigTest, Y2_WrongTypesAndRangesNameTheKeyAndTheLine) {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"lora_r: abc", "key 'lora_r' must be a positive integer, got \"abc\""},
        {"lora_r: -3", "key 'lora_r' must be a positive integer, got \"-3\""},
        {"lora_r: 0", "key 'lora_r' must be a positive integer, got \"0\""},
        {"lora_r: 2.5", "key 'lora_r' must be a positive integer, got \"2.5\""},
        {"sample_packing: [1]", "key 'sample_packing' must be true or false, got a list"},
        {"sample_packing: 2", "key 'sample_packing' must be true or false, got \"2\""},
        {"lora_dropout: 1.0", "key 'lora_dropout' must be a number in [0, 1), got \"1.0\""},
        {"lora_alpha: 0", "key 'lora_alpha' must be a number > 0, got \"0\""},
        {"optimizer: sgd",
         "key 'optimizer' must be one of paged_adamw_8bit, adamw_8bit, paged_adamw_32bit, adamw_torch, got \"sgd\""},
        {"lr_scheduler: {a: 1}", "key 'lr_scheduler' must be one of constant, linear, cosine, got a map"},
        {"learning_rate: fast", "key 'learning_rate' must be a number >= 0, got \"fast\""},
        {"learning_rate: .inf", "key 'learning_rate' must be a number >= 0, got \".inf\""},
        {"max_steps: 0", "key 'max_steps' must be -1 (derived from num_epochs) or a positive integer, got \"0\""},
        {"max_steps: -5", "key 'max_steps' must be -1 (derived from num_epochs) or a positive integer, got \"-5\""},
        {"gradient_accumulation_steps: 0", "key 'gradient_accumulation_steps' must be a positive integer, got \"0\""},
        {"num_epochs: 0", "key 'num_epochs' must be a number > 0, got \"0\""},
        {"val_set_size: 1.5",
         "key 'val_set_size' must be a fraction in [0, 1) or a whole count of examples, got \"1.5\""},
        {"val_set_size: 1.0",
         "key 'val_set_size' must be a fraction in [0, 1) or a whole count of examples, got \"1.0\""},
        {"val_set_size: -2",
         "key 'val_set_size' must be a fraction in [0, 1) or a whole count of examples, got \"-2\""},
        {"seed: 99999999999999999999", "key 'seed' must be an integer >= 0, got \"99999999999999999999\""},
        {"tokenizer: {a: 1}", "key 'tokenizer' must be a string, got a map"},
        {"tokenizer: ''", "key 'tokenizer' must be a path, got \"\""},
        {"bf16: maybe", "key 'bf16' must be true, false or auto, got \"maybe\""},
        {"adapter: full", "key 'adapter' must be one of qlora, lora, none, got \"full\""},
        {"lora_target_modules: q_proj",
         "key 'lora_target_modules' must be a list of module names (q_proj, k_proj, v_proj, o_proj, gate_proj, "
         "up_proj, down_proj, lm_head), got \"q_proj\""},
        {"lora_target_modules: [q_proj, qkv]",
         "key 'lora_target_modules' must be one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
         "lm_head, got \"qkv\""},
    };
    for (const auto& [line, msg] : cases) {
        EXPECT_EQ(error(kMinimal + line + "\n"), file_ + ":6: " + msg) << line;
    }
    // The line of the offending list element, and a multi-line value kept on one line.
    EXPECT_EQ(
        error(kMinimal + "lora_target_modules:\n  - q_proj\n  - qkv_proj\n"),
        file_ + ":8: key 'lora_target_modules' must be one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj, lm_head, got \"qkv_proj\""
    );
    EXPECT_EQ(
        error(kMinimal + "seed: 1\nlora_r: |\n  12\n  13\n"),
        file_ + ":7: key 'lora_r' must be a positive integer, got \"12\\n13\\n\""
    );
}

TEST_F(ConfigTest, Y2_DuplicateKeys) {
    EXPECT_EQ(error(kMinimal + "seed: 1\nseed: 2\n"), file_ + ":7: key 'seed' appears twice (first at line 6)");
    EXPECT_EQ(error(kMinimal + "output_dir: other\n"), file_ + ":6: key 'output_dir' appears twice (first at line 4)");
}

TEST_F(ConfigTest, YamlErrorsGiveTheLine) {
    EXPECT_EQ(error(kMinimal + "seed: 1\n bad: 2\n"), file_ + ":7: YAML syntax error: illegal map value");
    EXPECT_EQ(error(kMinimal + "seed: *nope\n"), file_ + ":6: YAML syntax error: the referenced anchor is not defined");
    EXPECT_EQ(
        error(kMinimal + "---\nseed: 1\n"), file_ + ":7: a config is one YAML document; a second one starts here"
    );
    EXPECT_EQ(error(""), file_ + ": the config is empty");
    EXPECT_EQ(error("# nothing\n"), file_ + ": the config is empty");
    EXPECT_EQ(error("- a\n- b\n"), file_ + ":1: expected a map of config keys, got a list");
    EXPECT_EQ(
        error("datasets:\n  - path: [a\n    type: text\n"),
        file_ + ":3: YAML syntax error: end of sequence flow not found"
    );
    for (const auto& [path, msg] : std::vector<std::pair<std::string, std::string>>{
             {dir_.string(), ": is a directory, not a config file"},
             {in_dir("missing.yaml"), ": cannot open the config file (No such file or directory)"}}) {
        try {
            qlora::config::load(path);
            ADD_FAILURE() << path;
        } catch (const std::runtime_error& e) {
            EXPECT_EQ(e.what(), path + msg);
        }
    }
}

TEST_F(ConfigTest, Y1_DeepNestingAliasBombsAndHugeFilesAreRefused) {
    const std::string deep = error(kMinimal + "seed: " + std::string(10000, '[') + std::string(10000, ']') + "\n");
    EXPECT_EQ(deep.rfind(file_ + ":6: YAML syntax error: ", 0), 0u) << deep;
    // Aliases are shared nodes, never expanded: ten levels of ten-fold references end at the first wrong element.
    std::string bomb = "lora_target_modules: [&a0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]";
    for (int i = 1; i < 10; ++i) {
        const std::string prev = "*a" + std::to_string(i - 1);
        bomb += ", &a" + std::to_string(i) + " [" + prev;
        for (int j = 1; j < 10; ++j) {
            bomb += ", " + prev;
        }
        bomb += "]";
    }
    EXPECT_EQ(
        error(kMinimal + bomb + "]\n"),
        file_ + ":6: key 'lora_target_modules' must be one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj, lm_head, got a list"
    );
    EXPECT_EQ(
        error(kMinimal + "# " + std::string(1 << 21, 'x') + "\n"),
        file_ + ": more than 1048576 bytes; a config is at most that"
    );
}

TEST_F(ConfigTest, MissingRequiredKeys) {
    const std::string datasets = "datasets:\n  - {path: a.jsonl, type: text}\n";
    EXPECT_EQ(
        error(datasets + "output_dir: o\nlora_target_linear: true\n"), file_ + ": required key 'base_model' is missing"
    );
    EXPECT_EQ(
        error("base_model: m\noutput_dir: o\nlora_target_linear: true\n"),
        file_ + ": required key 'datasets' is missing"
    );
    EXPECT_EQ(
        error("base_model: m\n" + datasets + "lora_target_linear: true\n"),
        file_ + ": required key 'output_dir' is missing"
    );
    EXPECT_EQ(
        error("base_model: m\n" + datasets + "lora_target_linear: true\noutput_dir:\n"),
        file_ + ":5: key 'output_dir' is required but has no value"
    );
}

TEST_F(ConfigTest, WarmupStepsAndRatioExcludeEachOther) {
    EXPECT_EQ(
        error(kMinimal + "warmup_steps: 3\nwarmup_ratio: 0.1\n"),
        file_ + ":7: key 'warmup_ratio' cannot be given together with warmup_steps (line 6); set one"
    );
    EXPECT_EQ(load(kMinimal + "warmup_steps: 3\nwarmup_ratio:\n").warmup_steps, 3); // null: not given
}

TEST_F(ConfigTest, AdapterDecidesLoadIn4bitAndTargets) {
    EXPECT_EQ(
        error(kMinimal + "load_in_4bit: false\n"),
        file_ + ":6: key 'load_in_4bit' must be true with adapter: qlora (adapter: lora trains LoRA on 16/32-bit "
                "weights)"
    );
    EXPECT_EQ(
        error(kMinimal + "adapter: lora\nload_in_4bit: true\n"),
        file_ + ":7: key 'load_in_4bit' is true, which needs adapter: qlora (adapter is lora)"
    );
    EXPECT_FALSE(load(kMinimal + "adapter: lora\n").load_in_4bit);
    const std::string no_targets = "base_model: m\ndatasets:\n  - {path: a.jsonl, type: text}\noutput_dir: o\n";
    const TrainConfig full = load(no_targets + "adapter: none\n");
    EXPECT_FALSE(full.load_in_4bit);
    EXPECT_TRUE(full.lora_target_modules.empty());
    EXPECT_EQ(
        error(no_targets),
        file_ + ": adapter qlora has no LoRA targets: set lora_target_linear: true or list lora_target_modules (e.g. "
                "[q_proj, v_proj])"
    );
    EXPECT_EQ(
        load(no_targets + "lora_target_modules: [v_proj, q_proj]\n").lora_target_modules,
        (std::vector<std::string>{"v_proj", "q_proj"})
    );
    // lora_target_linear adds the seven projections the list does not have, after it.
    EXPECT_EQ(
        load(kMinimal + "lora_target_modules: [lm_head, v_proj]\n").lora_target_modules,
        (std::vector<std::string>{
            "lm_head", "v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    );
}

TEST_F(ConfigTest, Overrides) {
    const fs::path cwd = fs::current_path();
    const TrainConfig c = load(
        kMinimal + "seed: 7\n", {"lora_r=4", "lora_r=16", "datasets.0.path=x.jsonl", "datasets.0.type=text",
                                 "lora_target_modules=[q_proj, v_proj]", "lora_target_linear=false",
                                 "seed=", "output_dir=/abs/out", "bf16=true"}
    );
    EXPECT_EQ(c.lora_r, 16); // in order: the last one wins
    EXPECT_EQ(c.datasets[0], (qlora::config::Dataset{(cwd / "x.jsonl").string(), "text"})); // relative to the cwd
    EXPECT_EQ(c.lora_target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
    EXPECT_EQ(c.seed, 42); // empty: back to the default
    EXPECT_EQ(c.output_dir, "/abs/out");
    EXPECT_TRUE(c.bf16);
    EXPECT_EQ(c.base_model, in_dir("models/llama")); // not overridden: relative to the config file

    const TrainConfig d = load(kMinimal, {"datasets.0={path: /a.jsonl, type: chat}"});
    EXPECT_EQ(d.datasets, (std::vector<qlora::config::Dataset>{{"/a.jsonl", "chat"}}));
    const TrainConfig e = load(kMinimal, {"datasets=[{path: /a.jsonl, type: text}, {path: b.jsonl, type: alpaca}]"});
    EXPECT_EQ(
        e.datasets, (std::vector<qlora::config::Dataset>{{"/a.jsonl", "text"}, {(cwd / "b.jsonl").string(), "alpaca"}})
    );
    // A required key may come from an override only.
    EXPECT_EQ(
        load("base_model: m\ndatasets: [{path: a, type: text}]\nlora_target_linear: true\n", {"output_dir=/o"})
            .output_dir,
        "/o"
    );
    // Overriding a key replaces its node, not the anchored node it shares with another key.
    const TrainConfig a = load(kMinimal + "eval_steps: &n 50\nsave_steps: *n\n", {"save_steps=10"});
    EXPECT_EQ(a.eval_steps, 50);
    EXPECT_EQ(a.save_steps, 10);
}

TEST_F(ConfigTest, OverrideErrorsNameTheOverride) {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"lora_rank=4", "override 'lora_rank=4': unknown key 'lora_rank'; did you mean 'lora_r'?"},
        {"lora_r", "override 'lora_r': expected key=value (e.g. lora_r=16 or datasets.0.path=data.jsonl)"},
        {"=4", "override '=4': expected key=value (e.g. lora_r=16 or datasets.0.path=data.jsonl)"},
        {"lora_r=abc", "override 'lora_r=abc': key 'lora_r' must be a positive integer, got \"abc\""},
        {"lora_target_modules=[q_proj",
         "override 'lora_target_modules=[q_proj': the value is not valid YAML (end of sequence flow not found)"},
        {"datasets.3.path=x", "override 'datasets.3.path=x': '3' is not an index of datasets (0 to 0)"},
        {"datasets.x.path=x", "override 'datasets.x.path=x': 'x' is not an index of datasets (0 to 0)"},
        {"datasets.0.typ=text", "override 'datasets.0.typ=text': unknown key 'datasets.0.typ'; did you mean 'type'?"},
        {"datasets.0.type=json",
         "override 'datasets.0.type=json': key 'datasets.0.type' must be one of alpaca, chat, completion, text, got "
         "\"json\""},
        {"datasets.0.path.x=1", "override 'datasets.0.path.x=1': key 'datasets.0.path' has no sub-keys"},
        {"lora_r.x=1", "override 'lora_r.x=1': key 'lora_r' has no sub-keys"},
        {"lora_r..x=1", "override 'lora_r..x=1': empty component in the key"},
        {"output_dir=", "override 'output_dir=': key 'output_dir' is required but has no value"},
        {"datasets=[{path: a, type: text, typo: 1}]",
         "override 'datasets=[{path: a, type: text, typo: 1}]': unknown key 'datasets.0.typo'; did you mean 'type'?"},
        {"lora_dropout=0.1\n2", "override 'lora_dropout=0.1\\n2': key 'lora_dropout' must be a number in [0, 1), got "
                                "\"0.1 2\""},
    };
    for (const auto& [o, msg] : cases) {
        EXPECT_EQ(error(kMinimal, {o}), msg) << o;
    }
    // An error in the file still names its line when overrides are given.
    EXPECT_EQ(error(kMinimal + "seed: x\n", {"lora_r=4"}), file_ + ":6: key 'seed' must be an integer >= 0, got \"x\"");
}

TEST_F(ConfigTest, RelativePathsResolveAgainstTheConfigDirectory) {
    const std::string text = "base_model: ../models/llama/\n"
                             "datasets:\n"
                             "  - {path: ./data/../data/a.jsonl, type: text}\n"
                             "  - {path: /abs/b.jsonl, type: text}\n"
                             "output_dir: runs/x\n"
                             "lora_model_dir: adapters/a\n"
                             "resume_from_checkpoint: runs/x/checkpoint-4\n"
                             "lora_target_linear: true\n";
    const std::string path = write(text, "sub/c.yaml");
    // Loaded through a path relative to the working directory: paths still follow the file.
    const TrainConfig c = qlora::config::load(fs::relative(path, fs::current_path()).string());
    EXPECT_EQ(c.base_model, in_dir("models/llama"));
    EXPECT_EQ(c.tokenizer, in_dir("models/llama/tokenizer.model"));
    EXPECT_EQ(c.datasets[0].path, in_dir("sub/data/a.jsonl"));
    EXPECT_EQ(c.datasets[1].path, "/abs/b.jsonl");
    EXPECT_EQ(c.output_dir, in_dir("sub/runs/x"));
    EXPECT_EQ(c.lora_model_dir, in_dir("sub/adapters/a"));
    EXPECT_EQ(c.resume_from_checkpoint, in_dir("sub/runs/x/checkpoint-4"));
    EXPECT_EQ(qlora::config::load(path, {"resume_from_checkpoint=auto"}).resume_from_checkpoint, "auto");
    EXPECT_EQ(
        qlora::config::load(path, {"resume_from_checkpoint=./auto"}).resume_from_checkpoint,
        (fs::current_path() / "auto").string()
    );
}

TEST_F(ConfigTest, ResolvedYamlRoundTrips) {
    const std::vector<std::string> texts = {
        kEveryKey, kMinimal, kMinimal + "warmup_steps: 7\nbf16: auto\nresume_from_checkpoint: auto\nadapter: lora\n",
        "base_model: \"models/a b: #c \\\"q\\\" \\\\ \\t\"\ndatasets: [{path: 'it''s.jsonl', type: text}]\noutput_dir: "
        "o\nadapter: none\n"};
    for (const std::string& text : texts) {
        const TrainConfig c = load(text);
        const std::string y = qlora::config::to_yaml(c);
        const TrainConfig back = qlora::config::load(write(y, "elsewhere/resolved.yaml"));
        EXPECT_EQ(back, c) << y;
        EXPECT_EQ(qlora::config::to_yaml(back), y);
        // Every key, once, in order.
        std::vector<std::string> keys;
        for (const auto& kv : YAML::Load(y)) {
            keys.push_back(kv.first.Scalar());
        }
        EXPECT_EQ(keys, kAllKeys);
    }
    EXPECT_EQ(load(texts[3]).base_model, in_dir("models/a b: #c \"q\" \\ \t"));
}

TEST_F(ConfigTest, FingerprintFollowsOnlyRunAffectingKeys) {
    const std::string f = qlora::config::fingerprint(load(kMinimal));
    EXPECT_EQ(f.size(), 16u);
    EXPECT_EQ(f.find_first_not_of("0123456789abcdef"), std::string::npos) << f;
    EXPECT_EQ(qlora::config::fingerprint(load(kMinimal)), f);
    for (const char* o :
         {"lora_r=16", "learning_rate=1e-4", "seed=1", "datasets.0.type=text", "sample_packing=true", "max_steps=10",
          "warmup_ratio=0.1", "bf16=true", "base_model=/m"}) {
        EXPECT_NE(qlora::config::fingerprint(load(kMinimal, {o})), f) << o;
    }
    for (const char* o :
         {"logging_steps=9", "eval_steps=5", "save_steps=5", "save_total_limit=2", "output_dir=/o",
          "resume_from_checkpoint=auto", "num_threads=3",
          "lora_target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"}) {
        EXPECT_EQ(qlora::config::fingerprint(load(kMinimal, {o})), f) << o;
    }
    std::vector<std::string> affecting;
    for (const auto& [k, v] : qlora::config::run_affecting(load(kMinimal))) {
        affecting.push_back(k);
    }
    std::vector<std::string> want;
    for (const std::string& k : kAllKeys) {
        if (k != "logging_steps" && k != "eval_steps" && k != "save_steps" && k != "save_total_limit" &&
            k != "output_dir" && k != "resume_from_checkpoint" && k != "num_threads" && k != "lora_target_linear") {
            want.push_back(k);
        }
    }
    EXPECT_EQ(affecting, want);
    // Stable across builds and versions: checkpoints store it. Numbers have 17 significant digits (drift messages).
    const TrainConfig pinned = qlora::config::parse(kMinimal, "pinned.yaml", "/cfg");
    const auto values = qlora::config::run_affecting(pinned);
    const auto lr =
        std::find_if(values.begin(), values.end(), [](const auto& kv) { return kv.first == "learning_rate"; });
    ASSERT_NE(lr, values.end());
    EXPECT_EQ(lr->second, "0.00020000000000000001");
    EXPECT_EQ(qlora::config::fingerprint(pinned), "5bbccd701d4dd158");
}

TEST(ConfigBundled, BundledConfigsParse) {
    for (const char* name :
         {"tiny/qlora.yaml", "tiny/pretrain.yaml", "llama-2-7b-qlora.yaml", "llama-3-8b-qlora.yaml"}) {
        EXPECT_NO_THROW(qlora::config::load(std::string(QLORA_SOURCE_DIR "/configs/") + name)) << name;
    }
}

} // namespace
