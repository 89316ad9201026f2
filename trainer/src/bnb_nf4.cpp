// trainer/src/bnb_nf4.cpp: see qlora/trainer/bnb_nf4.h.
#include "qlora/trainer/bnb_nf4.h"

#include <cstring>
#include <stdexcept>

#include <ATen/ATen.h>

#include "qlora/trainer/json.h"

namespace qlora::bnb {
namespace {

using safetensors::Checkpoint;

const char* const kStateSuffixes[] = {
    ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", kQuantStateSuffix};

[[noreturn]] void fail(const Checkpoint& ck, const std::string& name, const std::string& msg) {
    throw std::runtime_error(ck.file_of(name) + ": tensor \"" + name + "\" " + msg);
}

std::string shape_text(c10::IntArrayRef s) {
    return c10::str(s);
}

// The tensor `name` with exactly this dtype and shape.
at::Tensor
read_exact(const Checkpoint& ck, const std::string& name, at::ScalarType dtype, const std::vector<int64_t>& shape) {
    if (!ck.contains(name)) {
        throw std::runtime_error(ck.dir() + ": 4-bit weight needs tensor \"" + name + "\", which is missing");
    }
    const at::Tensor t = ck.read(name);
    if (t.scalar_type() != dtype || t.sizes() != c10::IntArrayRef(shape)) {
        fail(
            ck, name,
            "is " + std::string(c10::toString(t.scalar_type())) + " " + shape_text(t.sizes()) + ", expected " +
                c10::toString(dtype) + " " + shape_text(shape)
        );
    }
    return t;
}

at::ScalarType dtype_from_name(const std::string& s) {
    if (s == "float32") {
        return at::kFloat;
    }
    if (s == "bfloat16") {
        return at::kBFloat16;
    }
    if (s == "float16") {
        return at::kHalf;
    }
    return at::ScalarType::Undefined;
}

const char* dtype_to_name(at::ScalarType t) {
    switch (t) {
    case at::kFloat:
        return "float32";
    case at::kBFloat16:
        return "bfloat16";
    case at::kHalf:
        return "float16";
    default:
        throw std::runtime_error(std::string("bitsandbytes NF4: unsupported dtype ") + c10::toString(t));
    }
}

} // namespace

bool is_nf4(const Checkpoint& ck, const std::string& param) {
    return ck.contains(param + kQuantStateSuffix);
}

std::vector<std::string> nf4_state_names(const Checkpoint& ck, const std::string& param) {
    std::vector<std::string> out;
    for (const char* suffix : kStateSuffixes) {
        if (ck.contains(param + suffix)) {
            out.push_back(param + suffix);
        }
    }
    return out;
}

qlora::Nf4Tensor read_nf4(const Checkpoint& ck, const std::string& param, const std::vector<int64_t>& shape) {
    const std::string state_name = param + kQuantStateSuffix;
    const safetensors::TensorInfo& info = ck.info(state_name);
    if (info.dtype != safetensors::Dtype::kU8 || info.shape.size() != 1 || info.shape[0] > 4096) {
        fail(ck, state_name, "must be a uint8 vector of at most 4096 bytes holding JSON");
    }
    const at::Tensor bytes = ck.read(state_name);
    const std::string text(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
    const nlohmann::json j = qlora::trainer::parse_json_strict(text, ck.file_of(state_name) + ": " + state_name);
    const auto field = [&](const char* key) -> const nlohmann::json& {
        if (!j.is_object() || !j.contains(key)) {
            fail(ck, state_name, std::string("has no field '") + key + "'");
        }
        return j[key];
    };
    if (field("quant_type") != "nf4") {
        fail(ck, state_name, "has quant_type " + field("quant_type").dump() + "; qlora reads only \"nf4\"");
    }
    const nlohmann::json& bs = field("blocksize");
    if (!bs.is_number_integer() || bs.get<int64_t>() < 32 || bs.get<int64_t>() > 4096 ||
        (bs.get<int64_t>() & (bs.get<int64_t>() - 1)) != 0) {
        fail(ck, state_name, "has blocksize " + bs.dump() + ", expected a power of two from 32 to 4096");
    }
    const nlohmann::json& dt = field("dtype");
    const at::ScalarType dtype = dt.is_string() ? dtype_from_name(dt.get<std::string>()) : at::ScalarType::Undefined;
    if (dtype == at::ScalarType::Undefined) {
        fail(ck, state_name, "has dtype " + dt.dump() + ", expected \"float32\", \"bfloat16\" or \"float16\"");
    }
    if (field("shape") != nlohmann::json(shape)) {
        fail(
            ck, state_name,
            "has shape " + field("shape").dump() + " but config.json implies " + nlohmann::json(shape).dump()
        );
    }
    const bool nested = j.contains("nested_blocksize");
    int64_t n = 1;
    for (const int64_t d : shape) {
        n *= d; // shape comes from config.json, already checked against the checkpoint
    }
    const int64_t B = bs.get<int64_t>(), NB = (n + B - 1) / B, NB2 = (NB + 255) / 256;

    qlora::Nf4Tensor q;
    q.shape = shape;
    q.dtype = dtype;
    q.blocksize = B;
    q.packed = read_exact(ck, param, at::kByte, {(n + 1) / 2, 1});
    q.absmax = read_exact(ck, param + ".absmax", nested ? at::kByte : at::kFloat, {NB});
    const at::Tensor code = read_exact(ck, param + ".quant_map", at::kFloat, {16});
    if (!at::equal(code, qlora::nf4_code())) {
        fail(ck, param + ".quant_map", "is not the NF4 code table (another 4-bit format?)");
    }
    if (nested) {
        if (field("nested_blocksize") != 256 || field("nested_dtype") != "float32" ||
            !field("nested_offset").is_number()) {
            fail(
                ck, state_name,
                "needs nested_blocksize 256, nested_dtype \"float32\" and a numeric nested_offset, got " + j.dump()
            );
        }
        q.nested_absmax = read_exact(ck, param + ".nested_absmax", at::kFloat, {NB2});
        q.nested_code = read_exact(ck, param + ".nested_quant_map", at::kFloat, {256});
        if (!at::isfinite(q.nested_code).all().item<bool>() || !at::isfinite(q.nested_absmax).all().item<bool>()) {
            fail(ck, param + ".nested_quant_map", "or .nested_absmax holds a non-finite value");
        }
        q.offset = at::scalar_tensor(field("nested_offset").get<double>(), at::kFloat);
    } else {
        for (const char* suffix : {".nested_absmax", ".nested_quant_map"}) {
            if (ck.contains(param + suffix)) {
                fail(ck, param + suffix, "is present but the quant state has no nested_blocksize");
            }
        }
        if (!at::isfinite(q.absmax).all().item<bool>()) {
            fail(ck, param + ".absmax", "holds a non-finite value");
        }
    }
    return q;
}

std::vector<std::pair<std::string, at::Tensor>> nf4_tensors(const std::string& param, const qlora::Nf4Tensor& q) {
    // bitsandbytes writes json.dumps(...) of an insertion-ordered dict: ", " and ": " separators.
    std::string json = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(q.blocksize) + ", \"dtype\": \"" +
                       dtype_to_name(q.dtype) + "\", \"shape\": [";
    for (size_t i = 0; i < q.shape.size(); ++i) {
        json += (i ? ", " : "") + std::to_string(q.shape[i]);
    }
    json += "]";
    std::vector<std::pair<std::string, at::Tensor>> out = {
        {param, q.packed}, {param + ".absmax", q.absmax}, {param + ".quant_map", qlora::nf4_code()}};
    if (q.double_quantized()) {
        json += ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": " +
                nlohmann::json(static_cast<double>(q.offset.item<float>())).dump();
        out.emplace_back(param + ".nested_absmax", q.nested_absmax);
        out.emplace_back(param + ".nested_quant_map", q.nested_code);
    }
    json += "}";
    at::Tensor bytes = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
    std::memcpy(bytes.data_ptr(), json.data(), json.size());
    out.emplace_back(param + kQuantStateSuffix, bytes);
    return out;
}

nlohmann::json
quantization_config(at::ScalarType compute_dtype, bool double_quant, const std::vector<std::string>& dense_modules) {
    return {
        {"_load_in_4bit", true},
        {"_load_in_8bit", false},
        {"bnb_4bit_compute_dtype", dtype_to_name(compute_dtype)},
        {"bnb_4bit_quant_storage", "uint8"},
        {"bnb_4bit_quant_type", "nf4"},
        {"bnb_4bit_use_double_quant", double_quant},
        {"llm_int8_enable_fp32_cpu_offload", false},
        {"llm_int8_has_fp16_weight", false},
        {"llm_int8_skip_modules", dense_modules.empty() ? nlohmann::json(nullptr) : nlohmann::json(dense_modules)},
        {"llm_int8_threshold", 6.0},
        {"load_in_4bit", true},
        {"load_in_8bit", false},
        {"quant_method", "bitsandbytes"},
    };
}

void check_quantization_config(const nlohmann::json& config, const std::string& what) {
    if (!config.is_object() || !config.contains("quantization_config") || config["quantization_config"].is_null()) {
        return;
    }
    const nlohmann::json& q = config["quantization_config"];
    const auto refuse = [&](const std::string& key, const std::string& expected) {
        throw std::runtime_error(
            what + ": key 'quantization_config." + key + "' is " + (q.contains(key) ? q[key].dump() : "missing") +
            "; qlora reads " + expected
        );
    };
    if (!q.is_object()) {
        throw std::runtime_error(what + ": key 'quantization_config' must be an object");
    }
    if (!q.contains("quant_method") || q["quant_method"] != "bitsandbytes") {
        refuse("quant_method", "\"bitsandbytes\" 4-bit checkpoints only");
    }
    if (!q.contains("load_in_4bit") || q["load_in_4bit"] != true) {
        refuse("load_in_4bit", "true (8-bit checkpoints are not supported)");
    }
    if (!q.contains("bnb_4bit_quant_type") || q["bnb_4bit_quant_type"] != "nf4") {
        refuse("bnb_4bit_quant_type", "\"nf4\"");
    }
}

std::vector<std::string> skip_modules(const std::set<std::string>& dense_leaves) {
    if (dense_leaves == std::set<std::string>{"lm_head"}) {
        return {};
    }
    return {dense_leaves.begin(), dense_leaves.end()};
}

} // namespace qlora::bnb
