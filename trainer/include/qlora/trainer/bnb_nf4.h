// qlora/trainer/bnb_nf4.h: NF4 weights in the serialized form of bitsandbytes + transformers (spec
// nf4-and-optimizer.md §1.8), so checkpoints quantized by either side load in the other without re-quantization.
//
// A 4-bit weight `<param>` (e.g. model.layers.0.self_attn.q_proj.weight) is stored as
//   <param>                                   uint8 [ceil(n / 2), 1]   two codes per byte, first in the high nibble
//   <param>.absmax                            uint8 [NB] (double quant) or float32 [NB]
//   <param>.quant_map                         float32 [16]  the NF4 code
//   <param>.nested_absmax                     float32 [NB2]            (double quant only)
//   <param>.nested_quant_map                  float32 [256]            (double quant only)
//   <param>.quant_state.bitsandbytes__nf4     uint8: UTF-8 JSON {"quant_type": "nf4", "blocksize", "dtype" (float32,
//                                             bfloat16, float16), "shape", and with double quant "nested_blocksize"
//                                             (256), "nested_dtype" ("float32"), "nested_offset"}
// with n = prod(shape), NB = ceil(n / blocksize), NB2 = ceil(NB / 256); config.json carries a quantization_config
// with quant_method "bitsandbytes", load_in_4bit and bnb_4bit_quant_type "nf4". qlora writes the JSON exactly as
// bitsandbytes does (Python json.dumps with its default separators), so its files are byte-identical.
#pragma once

#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/ops.h"
#include "qlora/trainer/checkpoint.h"

namespace qlora::bnb {

inline constexpr const char* kQuantStateSuffix = ".quant_state.bitsandbytes__nf4";

// True when `param` is stored in this form in `ck` (its quant-state JSON tensor is present).
bool is_nf4(const safetensors::Checkpoint& ck, const std::string& param);

// The names of the quant-state tensors of `param` that are present in `ck` (not `param` itself).
std::vector<std::string> nf4_state_names(const safetensors::Checkpoint& ck, const std::string& param);

// Reads and validates a 4-bit weight whose logical shape must be `shape` (from config.json): every tensor's dtype and
// shape, the JSON fields, the code table (NF4's, exactly) and the presence of the nested tensors exactly when the JSON
// says double quantization. Errors are one line naming the file and the tensor.
qlora::Nf4Tensor
read_nf4(const safetensors::Checkpoint& ck, const std::string& param, const std::vector<int64_t>& shape);

// The tensors of `q` under `param`, in the form above.
std::vector<std::pair<std::string, at::Tensor>> nf4_tensors(const std::string& param, const qlora::Nf4Tensor& q);

// The quantization_config transformers expects for a model whose NF4 projections are those not named in
// `dense_modules` (leaf names such as "lm_head" or "k_proj", transformers' llm_int8_skip_modules).
nlohmann::json
quantization_config(at::ScalarType compute_dtype, bool double_quant, const std::vector<std::string>& dense_modules);

// transformers' llm_int8_skip_modules for a model whose dense (not 4-bit) projections have the leaf names
// `dense_leaves`: empty when only "lm_head" is dense (null in the config keeps transformers' default, which skips the
// output layer), else all of them (a given list replaces that default).
std::vector<std::string> skip_modules(const std::set<std::string>& dense_leaves);

// Checks a config.json's quantization_config (when present): bitsandbytes 4-bit NF4 is accepted, anything else
// (8-bit, FP4, another method) is refused naming the key. `what` names the file.
void check_quantization_config(const nlohmann::json& config, const std::string& what);

} // namespace qlora::bnb
