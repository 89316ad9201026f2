// trainer/src/json.cpp: see qlora/trainer/json.h.
#include "qlora/trainer/json.h"

#include <cstring>
#include <fstream>
#include <set>
#include <stdexcept>
#include <vector>

namespace qlora::trainer {

nlohmann::json parse_json_strict(const std::string& text, const std::string& what) {
    if (const void* nul = std::memchr(text.data(), 0, text.size())) {
        throw std::runtime_error(
            what + ": NUL byte at offset " + std::to_string(static_cast<const char*>(nul) - text.data()) + " (not JSON)"
        );
    }
    constexpr int kMaxDepth = 64;
    std::vector<std::set<std::string>> keys; // one set per open object
    std::string error;
    const auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        if (!error.empty()) {
            return false;
        }
        if (depth > kMaxDepth) {
            error = "nesting deeper than " + std::to_string(kMaxDepth) + " levels";
            return false;
        }
        switch (event) {
        case nlohmann::json::parse_event_t::object_start:
            keys.emplace_back();
            break;
        case nlohmann::json::parse_event_t::object_end:
            if (!keys.empty()) {
                keys.pop_back();
            }
            break;
        case nlohmann::json::parse_event_t::key:
            if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second) {
                error = "duplicate key \"" + parsed.get<std::string>() + "\"";
                return false;
            }
            break;
        default:
            break;
        }
        return true;
    };
    nlohmann::json out;
    try {
        out = nlohmann::json::parse(text, callback, /*allow_exceptions=*/true);
    } catch (const nlohmann::json::exception& e) {
        if (error.empty()) {
            std::string msg = e.what();
            const size_t at = msg.find("error: ");
            error = "invalid JSON: " + (at == std::string::npos ? msg : msg.substr(at + 7));
        }
    }
    if (!error.empty()) {
        throw std::runtime_error(what + ": " + error);
    }
    return out;
}

nlohmann::json read_json_file(const std::string& path, size_t max_bytes) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) {
        throw std::runtime_error(path + ": cannot open");
    }
    const std::streamoff size = in.tellg();
    if (size < 0 || static_cast<size_t>(size) > max_bytes) {
        throw std::runtime_error(
            path + ": " + std::to_string(size) + " bytes is larger than the " + std::to_string(max_bytes) +
            "-byte limit for this file"
        );
    }
    std::string text(static_cast<size_t>(size), '\0');
    in.seekg(0);
    in.read(text.data(), size);
    if (!in) {
        throw std::runtime_error(path + ": read failed");
    }
    return parse_json_strict(text, path);
}

} // namespace qlora::trainer
