// trainer/src/export.cpp: the exporters of qlora/trainer/merge.h.
//
// Note [TorchScript export]
// C++ has no torch.jit.script of a C++ module, and tracing specialises shapes, so the TorchScript module is built
// directly: its weights become attributes (per layer as List[Tensor], so forward loops over layers), and forward is
// TorchScript source compiled by LibTorch's own compiler (Module::define). The source only calls ATen operators
// (aten::embedding, linear, scaled_dot_product_attention, silu, ...), so loading the archive needs no qlora library.
// The math is LlamaForCausalLM's (llama.cpp): float32 RMSNorm, split-half RoPE from the config's inverse
// frequencies, grouped-query attention through SDPA with a causal mask, SwiGLU, tied or separate head. Dtypes are
// ScalarType numbers (4 = int64, 6 = float32): names like torch.float32 resolve only through Python.
#include <cstdio>
#include <filesystem>
#include <stdexcept>

#include <torch/csrc/jit/api/module.h>

#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/merge.h"

namespace qlora::llama {
namespace {

constexpr const char* kForwardSource = R"JIT(
def rms(self, x: Tensor, w: Tensor) -> Tensor:
    h = x.to(6)
    variance = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(variance + self.eps)).to(x.dtype)

def proj(self, x: Tensor, w: Tensor, b: List[Tensor], i: int, has_bias: bool) -> Tensor:
    if has_bias:
        return torch.linear(x, w, b[i])
    return torch.linear(x, w)

def rotate_half(self, x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat([-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)

def forward(self, input_ids: Tensor) -> Tensor:
    B = input_ids.size(0)
    T = input_ids.size(1)
    H = self.heads
    K = self.kv_heads
    D = self.head_dim
    x = torch.embedding(self.embed, input_ids)
    freqs = torch.outer(torch.arange(T, dtype=4).to(6), self.inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos = (emb.cos() * self.attention_scaling).to(x.dtype)
    sin = (emb.sin() * self.attention_scaling).to(x.dtype)
    for i in range(self.n_layers):
        h = self.rms(x, self.ln1[i])
        q = self.proj(h, self.wq[i], self.bq, i, self.attn_bias).view(B, T, H, D).transpose(1, 2)
        k = self.proj(h, self.wk[i], self.bk, i, self.attn_bias).view(B, T, K, D).transpose(1, 2)
        v = self.proj(h, self.wv[i], self.bv, i, self.attn_bias).view(B, T, K, D).transpose(1, 2)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        if K != H:
            k = k.repeat_interleave(H // K, 1)
            v = v.repeat_interleave(H // K, 1)
        o = torch.scaled_dot_product_attention(q, k, v, None, 0.0, True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, H * D), self.wo[i], self.bo, i, self.attn_bias)
        h = self.rms(x, self.ln2[i])
        g = self.proj(h, self.wg[i], self.bg, i, self.mlp_bias)
        u = self.proj(h, self.wu[i], self.bu, i, self.mlp_bias)
        x = x + self.proj(torch.silu(g) * u, self.wd[i], self.bd, i, self.mlp_bias)
    return torch.linear(self.rms(x, self.final_norm), self.lm_head)
)JIT";

void check_dense(LlamaForCausalLM& m) {
    for (const auto& item : m->named_modules()) {
        if (const auto* p = item.value()->as<Projection>()) {
            if (p->quantized() || p->has_lora() || p->swapped_a.defined()) {
                throw std::runtime_error(
                    "export: module " + item.key() + " is NF4 or has LoRA; export a merged model (qlora merge)"
                );
            }
        }
    }
}

class TorchScriptExporter final : public Exporter {
  public:
    std::string format() const override { return "torchscript"; }

    void write(LlamaForCausalLM& m, const std::string& out) const override {
        check_dense(m);
        const LlamaConfig& c = m->model->config;
        torch::jit::Module mod(c10::QualifiedName("__torch__.qlora.LlamaForCausalLM"));
        const auto tensor = [&](const char* name, const at::Tensor& t) {
            mod.register_attribute(name, c10::TensorType::get(), t.detach().contiguous());
        };
        tensor("embed", m->model->embed_tokens->weight);
        tensor("final_norm", m->model->norm->weight);
        tensor("lm_head", m->lm_head ? m->lm_head->weight : m->model->embed_tokens->weight);
        tensor("inv_freq", m->model->inv_freq);
        std::map<std::string, c10::List<at::Tensor>> lists;
        for (const char* n :
             {"ln1", "ln2", "wq", "wk", "wv", "wo", "wg", "wu", "wd", "bq", "bk", "bv", "bo", "bg", "bu", "bd"}) {
            lists.emplace(n, c10::List<at::Tensor>());
        }
        for (size_t i = 0; i < m->model->layers->size(); ++i) {
            auto* layer = m->model->layers->ptr<DecoderLayerImpl>(i).get();
            const auto add = [&](const char* w, const char* b, const Projection& p) {
                lists.at(w).push_back(p->weight.detach().contiguous());
                if (p->bias.defined()) {
                    lists.at(b).push_back(p->bias.detach().contiguous());
                }
            };
            lists.at("ln1").push_back(layer->input_layernorm->weight.detach().contiguous());
            lists.at("ln2").push_back(layer->post_attention_layernorm->weight.detach().contiguous());
            add("wq", "bq", layer->self_attn->q_proj);
            add("wk", "bk", layer->self_attn->k_proj);
            add("wv", "bv", layer->self_attn->v_proj);
            add("wo", "bo", layer->self_attn->o_proj);
            add("wg", "bg", layer->mlp->gate_proj);
            add("wu", "bu", layer->mlp->up_proj);
            add("wd", "bd", layer->mlp->down_proj);
        }
        for (auto& [name, list] : lists) {
            mod.register_attribute(name, c10::ListType::ofTensors(), c10::IValue(list));
        }
        mod.register_attribute("n_layers", c10::IntType::get(), c.num_hidden_layers);
        mod.register_attribute("heads", c10::IntType::get(), c.num_attention_heads);
        mod.register_attribute("kv_heads", c10::IntType::get(), c.num_key_value_heads);
        mod.register_attribute("head_dim", c10::IntType::get(), c.head_dim);
        mod.register_attribute("eps", c10::FloatType::get(), c.rms_norm_eps);
        mod.register_attribute("attention_scaling", c10::FloatType::get(), m->model->attention_scaling);
        mod.register_attribute("attn_bias", c10::BoolType::get(), c.attention_bias);
        mod.register_attribute("mlp_bias", c10::BoolType::get(), c.mlp_bias);
        mod.define(kForwardSource);
        mod.eval();
        // Atomic replace: Module::save writes the archive to a file, so save beside the target and rename.
        const std::filesystem::path target(out);
        const std::filesystem::path tmp = target.parent_path() / ("." + target.filename().string() + ".partial");
        mod.save(tmp.string());
        if (std::rename(tmp.c_str(), target.c_str()) != 0) {
            std::filesystem::remove(tmp);
            throw std::runtime_error(out + ": cannot rename the written archive into place");
        }
        qlora::trainer::sync_directory(target.parent_path().empty() ? "." : target.parent_path().string());
    }
};

class SafetensorsExporter final : public Exporter {
  public:
    std::string format() const override { return "safetensors"; }
    void write(LlamaForCausalLM& m, const std::string& out) const override {
        check_dense(m);
        save_model(m, out);
    }
};

} // namespace

std::unique_ptr<Exporter> make_exporter(const std::string& format) {
    if (format == "torchscript") {
        return std::make_unique<TorchScriptExporter>();
    }
    if (format == "safetensors") {
        return std::make_unique<SafetensorsExporter>();
    }
    throw std::runtime_error("export: --format must be torchscript or safetensors, got '" + format + "'");
}

} // namespace qlora::llama
