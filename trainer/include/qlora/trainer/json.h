// qlora/trainer/json.h: strict JSON for the files the trainer reads (config.json, model.safetensors.index.json,
// adapter_config.json): duplicate keys at any level, NUL bytes and nesting deeper than 64 are errors (nlohmann keeps
// the last duplicate silently and stops at a NUL), and every error is one line naming the file.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace qlora::trainer {

// Parses `text`; `what` (usually the path) prefixes error messages. Throws std::runtime_error.
nlohmann::json parse_json_strict(const std::string& text, const std::string& what);

// Reads and parses a file (at most `max_bytes`, so a huge file is refused before it is read).
nlohmann::json read_json_file(const std::string& path, size_t max_bytes = size_t{64} << 20);

} // namespace qlora::trainer
