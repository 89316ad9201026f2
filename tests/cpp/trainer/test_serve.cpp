// tests/cpp/trainer/test_serve.cpp: what users do after training (issue 7) on a random tiny Llama written to disk:
// the key/value cache (cached logits equal full forwards; cached greedy generation equals uncached), stop strings,
// adapter hot-swap (A -> B -> A bit for bit, none = the base, errors), merging (merged logits equal the adapter
// model's within float32 rounding; 4-bit refused unless forced) and the TorchScript export (loaded back with
// torch::jit::load, stock LibTorch only, equal logits).
#include <filesystem>
#include <fstream>
#include <random>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/csrc/jit/serialization/import.h>

#include "qlora/trainer/adapters.h"
#include "qlora/trainer/generate.h"
#include "qlora/trainer/merge.h"

namespace {

namespace fs = std::filesystem;
using namespace qlora::llama;

LlamaConfig tiny_config() {
    LlamaConfig c;
    c.vocab_size = 48;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 128;
    return c;
}

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
    fs::path path;
    TempDir() {
        std::random_device rd;
        path = fs::temp_directory_path() / ("qlora_test_serve_" + std::to_string(rd()) + std::to_string(rd()));
        fs::create_directories(path);
    }
    ~TempDir() { fs::remove_all(path); }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// A random base model written as a Hugging Face directory (weights scaled up so predictions are confident).
std::string write_base(const TempDir& tmp, uint64_t seed = 0) {
    torch::manual_seed(seed);
    LlamaForCausalLM m(tiny_config());
    torch::NoGradGuard no_grad;
    for (auto& p : m->parameters()) {
        if (p.dim() == 2) {
            p.normal_(0.0, 0.3);
        }
    }
    const std::string dir = tmp / "base";
    save_model(m, dir);
    return dir;
}

// A PEFT adapter over `base` with random (non-zero) B, written to tmp/name.
std::string write_adapter(
    const TempDir& tmp, const std::string& base, const std::string& name, uint64_t seed,
    std::vector<std::string> targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
) {
    LoadOptions lo;
    lo.lora = LoraSpec{};
    lo.lora->target_modules = std::move(targets);
    lo.lora->r = 4;
    lo.lora->lora_alpha = 8;
    torch::manual_seed(seed);
    LlamaForCausalLM m = load_model(base, lo);
    torch::NoGradGuard no_grad;
    for (auto& item : m->named_parameters()) {
        if (item.key().find("lora_B") != std::string::npos) {
            item.value().normal_(0.0, 0.2);
        }
    }
    const std::string dir = tmp / name;
    save_adapter(m, dir, base);
    return dir;
}

at::Tensor ids_of(std::vector<int64_t> v) {
    return torch::tensor(v, at::kLong).view({1, -1});
}

// float32, same weights, a different attention path (cached keys, explicit masks): differences are summation-order
// rounding, a few ulps of the logits' scale.
void expect_close(const at::Tensor& a, const at::Tensor& b, double rel = 1e-5) {
    const double scale = a.abs().max().item<double>();
    EXPECT_LE((a - b).abs().max().item<double>(), rel * scale) << "max |a| " << scale;
}

TEST(KvCacheTest, CachedLogitsEqualFullForwardsForChunksAndSingleTokens) {
    TempDir tmp;
    LlamaForCausalLM m = load_model(write_base(tmp), {});
    m->eval();
    torch::NoGradGuard no_grad;
    const std::vector<int64_t> seq = {1, 7, 9, 22, 5, 31, 2, 40, 11, 3};
    const at::Tensor full = m->forward(ids_of(seq))[0];
    KVCache cache = make_kv_cache(m, 1, 16, at::kFloat);
    const at::Tensor a = m->forward_cached(ids_of({1, 7, 9, 22}), cache)[0]; // prefill
    const at::Tensor b = m->forward_cached(ids_of({5}), cache)[0];           // one token
    const at::Tensor c = m->forward_cached(ids_of({31, 2, 40}), cache)[0];   // a chunk after a prefix
    const at::Tensor d = m->forward_cached(ids_of({11, 3}), cache)[0];
    EXPECT_EQ(cache.length, 10);
    expect_close(at::cat({a, b, c, d}, 0), full);
    EXPECT_THROW(m->forward_cached(ids_of({1, 2, 3, 4, 5, 6, 7}), cache), c10::Error); // 17 > capacity 16
}

TEST(KvCacheTest, CachedGreedyGenerationEqualsUncached) {
    TempDir tmp;
    for (const bool nf4 : {false, true}) {
        LoadOptions lo;
        if (nf4) {
            lo.lora = LoraSpec{};
        }
        LlamaForCausalLM m = load_model(write_base(tmp, 3), lo);
        GenerateOptions opt;
        opt.max_new_tokens = 24;
        const auto cached = generate(m, {2, 9, 4}, opt);
        opt.use_kv_cache = false;
        EXPECT_EQ(generate(m, {2, 9, 4}, opt), cached) << "nf4=" << nf4;
        fs::remove_all(tmp / "base");
    }
}

TEST(GenerateTest, StopStringsCutTheTextBeforeTheString) {
    TempDir tmp;
    LlamaForCausalLM m = load_model(write_base(tmp), {});
    GenerateOptions opt;
    opt.max_new_tokens = 12;
    // A toy decoder: token t -> letter 'a' + t % 26, so the text of the ids is known.
    opt.decode = [](const std::vector<int64_t>& ids) {
        std::string s;
        for (int64_t t : ids) {
            s.push_back(static_cast<char>('a' + t % 26));
        }
        return s;
    };
    const GenerateResult full = generate_text(m, {1, 2}, opt);
    ASSERT_EQ(full.text.size(), 12u);
    EXPECT_EQ(full.stop, GenerateResult::Stop::kMaxTokens);
    opt.stop_strings = {full.text.substr(5, 2)};
    const GenerateResult cut = generate_text(m, {1, 2}, opt);
    const size_t at = full.text.find(opt.stop_strings[0]);
    EXPECT_EQ(cut.stop, GenerateResult::Stop::kStopString);
    EXPECT_EQ(cut.text, full.text.substr(0, at));
    EXPECT_EQ(cut.ids.size(), at + 2); // generation ended on the token that completed the string
}

TEST(AdapterSetTest, HotSwapIsBitExactAndNoneIsTheBase) {
    TempDir tmp;
    const std::string base = write_base(tmp);
    const std::string a = write_adapter(tmp, base, "a", 1), b = write_adapter(tmp, base, "b", 2);
    LoadOptions lo;
    lo.lora = LoraSpec{};
    lo.add_lora = false;
    AdapterSet set(load_model(base, lo));
    set.add("a", a);
    set.add("b", b);
    set.model()->eval();
    torch::NoGradGuard no_grad;
    const at::Tensor ids = ids_of({3, 1, 4, 1, 5, 9, 2, 6});
    const at::Tensor none0 = set.model()->forward(ids);
    set.activate("a");
    const at::Tensor la = set.model()->forward(ids);
    set.activate("b");
    const at::Tensor lb = set.model()->forward(ids);
    set.activate("a");
    EXPECT_TRUE(at::equal(set.model()->forward(ids), la)) << "A -> B -> A must give A's logits bit for bit";
    set.activate("none");
    EXPECT_TRUE(at::equal(set.model()->forward(ids), none0));
    EXPECT_FALSE(at::equal(la, lb));
    EXPECT_FALSE(at::equal(la, none0));
    // The swapped adapter computes exactly what a model loaded with that one adapter computes.
    LlamaForCausalLM single = load_model(base, {});
    load_adapter(single, a); // quantizes the adapter's targets, adds its LoRA layers and loads them
    single->eval();
    EXPECT_TRUE(at::equal(single->forward(ids), la));
    // The base without adapters equals a plain NF4 model.
    LoadOptions one;
    one.lora = LoraSpec{};
    LlamaForCausalLM plain = load_model(base, one);
    plain->eval();
    EXPECT_TRUE(at::equal(plain->forward(ids), none0)); // lora_B = 0 at init
    try {
        set.activate("c");
        FAIL() << "unknown adapter accepted";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("no adapter named 'c' (loaded: none, a, b)"), std::string::npos);
    }
    EXPECT_THROW(set.add("a", b), c10::Error); // name taken
}

TEST(AdapterSetTest, BadAdaptersAreRefusedNamingTheFileAndModule) {
    TempDir tmp;
    const std::string base = write_base(tmp);
    const std::string a = write_adapter(tmp, base, "a", 1);
    const std::string narrow = write_adapter(tmp, base, "narrow", 1, {"q_proj", "v_proj"});
    LoadOptions lo;
    lo.lora = LoraSpec{};
    lo.add_lora = false;
    AdapterSet set(load_model(base, lo));
    const auto message = [&](const std::string& dir) {
        try {
            set.add("x", dir);
        } catch (const std::exception& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    // Config says every projection, file has only q and v: a target without weights.
    fs::copy_file(
        fs::path(a) / "adapter_config.json", fs::path(narrow) / "adapter_config.json",
        fs::copy_options::overwrite_existing
    );
    const std::string missing = message(narrow);
    EXPECT_EQ(
        missing.rfind(narrow + "/adapter_model.safetensors: no lora_A and lora_B for module model.layers.", 0), 0u
    ) << missing;
    EXPECT_NE(missing.find(" (a target)"), std::string::npos) << missing;
    // A different rank in the config than in the file.
    {
        std::ifstream in(fs::path(a) / "adapter_config.json");
        std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const size_t pos = text.find("\"r\": 4");
        ASSERT_NE(pos, std::string::npos);
        text.replace(pos, 6, "\"r\": 8");
        std::ofstream(fs::path(a) / "adapter_config.json") << text;
    }
    const std::string m = message(a);
    // The first tensor in the file's order: down_proj's A [4, 128] (r = 4 in the file, 8 in the config).
    EXPECT_NE(
        m.find("adapter_model.safetensors: base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has "
               "shape [4, 128] but module model.layers.0.mlp.down_proj with r = 8 expects [8, 128]"),
        std::string::npos
    ) << m;
    EXPECT_TRUE(set.names().empty()); // nothing half-added
}

MergeOptions merge_options(const std::string& base, const std::string& adapter) {
    MergeOptions mo;
    mo.base_dir = base;
    mo.adapter_dir = adapter;
    return mo;
}

TEST(MergeTest, MergedLogitsEqualTheAdapterModelAndReloadFromDisk) {
    TempDir tmp;
    const std::string base = write_base(tmp);
    const std::string a = write_adapter(tmp, base, "a", 1, {"q_proj", "v_proj", "down_proj"});
    LoadOptions lo;
    lo.lora = read_adapter_config(a);
    LlamaForCausalLM reference = load_model(base, lo);
    load_adapter(reference, a);
    const MergeOptions mo = merge_options(base, a);
    const MergedModel merged = merge_tensors(mo);
    EXPECT_EQ(merged.merged_modules.size(), 6u); // 3 targets x 2 layers
    EXPECT_EQ(merged.dtype, "float32");
    LlamaForCausalLM dense = merged_model(merged, at::kFloat);
    const ProbeResult p = probe_logits(reference, dense);
    // W + s·B·A folded once in float32 vs the same terms summed per token: rounding of the logits' scale.
    EXPECT_LE(p.max_abs_diff, 1e-5 * p.max_abs_logit) << p.max_abs_diff;
    EXPECT_EQ(write_merged(merged, mo, tmp / "merged"), 0.0); // no 4-bit rounding for a float32 merge
    LlamaForCausalLM reloaded = load_model(tmp / "merged", {});
    EXPECT_EQ(probe_logits(dense, reloaded).max_abs_diff, 0.0);
    EXPECT_TRUE(fs::exists(tmp / "merged/config.json"));
    EXPECT_THROW(write_merged(merged, mo, tmp / "merged"), std::runtime_error); // never overwrites
    // Into the dense base: differs from the NF4 adapter model by about the NF4 rounding, not more.
    MergeOptions md = mo;
    md.dense_dir = base;
    LlamaForCausalLM into_dense = merged_model(merge_tensors(md), at::kFloat);
    LlamaForCausalLM base_dense = load_model(base, {});
    LoadOptions nf4;
    nf4.lora = LoraSpec{};
    nf4.lora->target_modules = {"q_proj", "v_proj", "down_proj"};
    LlamaForCausalLM base_nf4 = load_model(base, nf4);
    const double nf4_rounding = probe_logits(base_dense, base_nf4).max_abs_diff;
    EXPECT_LE(probe_logits(reference, into_dense).max_abs_diff, 2.0 * nf4_rounding);
}

TEST(MergeTest, FourBitIsRefusedUnlessForcedAndThenLoadsAsNf4) {
    TempDir tmp;
    const std::string base = write_base(tmp);
    const std::string a = write_adapter(tmp, base, "a", 1);
    MergeOptions mo = merge_options(base, a);
    mo.dtype = "nf4";
    try {
        merge_tensors(mo);
        FAIL() << "nf4 merge without force accepted";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("pass --force"), std::string::npos);
    }
    mo.force = true;
    const MergedModel merged = merge_tensors(mo);
    const double rms = write_merged(merged, mo, tmp / "m4");
    EXPECT_GT(rms, 0.0);
    EXPECT_LT(rms, 0.2); // NF4's step over Gaussian-like weights is ~10 % RMS
    LlamaForCausalLM m4 = load_model(tmp / "m4", {});
    int64_t quantized = 0;
    for (const auto& item : m4->named_modules()) {
        if (const auto* p = item.value()->as<Projection>()) {
            quantized += p->quantized() ? 1 : 0;
        }
    }
    EXPECT_EQ(quantized, 14);
}

TEST(ExportTest, TorchScriptLoadsWithStockLibTorchAndGivesTheSameLogits) {
    TempDir tmp;
    const std::string base = write_base(tmp);
    const std::string a = write_adapter(tmp, base, "a", 1);
    LlamaForCausalLM dense = merged_model(merge_tensors(merge_options(base, a)), at::kFloat);
    const std::string out = tmp / "model.pt";
    make_exporter("torchscript")->write(dense, out);
    torch::jit::Module loaded = torch::jit::load(out);
    torch::NoGradGuard no_grad;
    dense->eval();
    for (const int64_t T : {1, 7, 33}) {
        const at::Tensor ids = at::randint(48, {2, T}, at::TensorOptions(at::kLong));
        const at::Tensor got = loaded.forward({ids}).toTensor();
        expect_close(got, dense->forward(ids));
    }
    LlamaForCausalLM nf4 = load_model(base, LoadOptions{at::kFloat, LoraSpec{}, true});
    EXPECT_THROW(make_exporter("torchscript")->write(nf4, tmp / "nf4.pt"), std::runtime_error);
    EXPECT_THROW(make_exporter("onnx"), std::runtime_error);
}

} // namespace
