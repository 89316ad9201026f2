// trainer/src/checkpoint.cpp: see qlora/trainer/checkpoint.h.
#include "qlora/trainer/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <regex>
#include <set>

#include "qlora/trainer/atomic_file.h"
#include "qlora/trainer/json.h"

namespace qlora::safetensors {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void fail(const std::string& what, const std::string& msg) {
    throw SafetensorsError(what + ": " + msg);
}

bool plain_file_name(const std::string& s) {
    return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos && s.find('\\') == std::string::npos;
}

} // namespace

Checkpoint Checkpoint::open(const std::string& dir) {
    Checkpoint c;
    c.dir_ = dir;
    const fs::path root(dir);
    const fs::path index = root / "model.safetensors.index.json";
    const fs::path single = root / "model.safetensors";
    if (fs::exists(index)) {
        const std::string what = index.string();
        nlohmann::json j;
        try {
            j = qlora::trainer::read_json_file(what);
        } catch (const std::runtime_error& e) {
            throw SafetensorsError(e.what());
        }
        if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
            fail(what, "expected an object with a \"weight_map\" object");
        }
        std::map<std::string, std::set<std::string>> by_shard; // shard -> tensor names
        for (const auto& [name, shard] : j["weight_map"].items()) {
            if (!shard.is_string()) {
                fail(what, "weight_map[\"" + name + "\"] is not a string");
            }
            const std::string file = shard.get<std::string>();
            if (!plain_file_name(file)) {
                fail(
                    what, "weight_map[\"" + name + "\"] = \"" + file +
                              "\" is not a plain file name inside the model directory"
                );
            }
            by_shard[file].insert(name);
        }
        for (const auto& [file, names] : by_shard) {
            if (!fs::is_regular_file(root / file)) {
                fail(what, "shard \"" + file + "\" (holding \"" + *names.begin() + "\") does not exist");
            }
        }
        for (const auto& [file, names] : by_shard) {
            c.files_.push_back(File::open((root / file).string()));
            const File& f = c.files_.back();
            for (const TensorInfo& t : f.header().tensors) {
                if (names.count(t.name) == 0) {
                    const nlohmann::json& map = j.at("weight_map");
                    fail(
                        f.path(), "holds \"" + t.name + "\", which the index " +
                                      (map.contains(t.name) ? "assigns to \"" + map.at(t.name).get<std::string>() + "\""
                                                            : std::string("does not list"))
                    );
                }
                c.where_[t.name] = c.files_.size() - 1;
            }
            for (const std::string& name : names) {
                if (f.find(name) == nullptr) {
                    fail(f.path(), "does not hold \"" + name + "\", which the index assigns to it");
                }
            }
        }
        return c;
    }
    if (fs::exists(single)) {
        c.files_.push_back(File::open(single.string()));
        for (const TensorInfo& t : c.files_.back().header().tensors) {
            c.where_[t.name] = 0;
        }
        return c;
    }
    for (const char* pickle : {"pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth"}) {
        if (fs::exists(root / pickle)) {
            fail(
                dir, std::string("only safetensors weights are accepted, found ") + pickle +
                         " (pickle); convert it with the safetensors package first"
            );
        }
    }
    fail(dir, "no model.safetensors or model.safetensors.index.json");
}

std::vector<std::string> Checkpoint::names() const {
    std::vector<std::string> out;
    for (const auto& [name, _] : where_) {
        out.push_back(name);
    }
    return out;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) {
        fail(dir_, "checkpoint has no tensor \"" + name + "\"");
    }
    return *files_[it->second].find(name);
}

at::Tensor Checkpoint::tensor(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) {
        fail(dir_, "checkpoint has no tensor \"" + name + "\"");
    }
    return files_[it->second].tensor(name);
}

at::Tensor Checkpoint::read(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) {
        fail(dir_, "checkpoint has no tensor \"" + name + "\"");
    }
    return files_[it->second].read(name);
}

std::vector<std::string> Checkpoint::names_in_storage_order() const {
    std::vector<std::string> out;
    for (const File& f : files_) {
        for (const TensorInfo& t : f.header().tensors) { // data order (parse_header)
            out.push_back(t.name);
        }
    }
    return out;
}

const std::string& Checkpoint::file_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) {
        fail(dir_, "checkpoint has no tensor \"" + name + "\"");
    }
    return files_[it->second].path();
}

void save_checkpoint(
    const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors, uint64_t max_shard_bytes
) {
    fs::create_directories(dir);
    std::vector<std::vector<std::pair<std::string, at::Tensor>>> shards(1);
    uint64_t in_shard = 0, total = 0;
    for (const auto& named : tensors) {
        const uint64_t bytes = named.second.nbytes();
        if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
            shards.emplace_back();
            in_shard = 0;
        }
        shards.back().push_back(named);
        in_shard += bytes;
        total += bytes;
    }
    std::set<std::string> written;
    if (shards.size() == 1) {
        save((fs::path(dir) / "model.safetensors").string(), shards[0]);
        written.insert("model.safetensors");
    } else {
        nlohmann::json weight_map = nlohmann::json::object();
        char name[64];
        for (size_t i = 0; i < shards.size(); ++i) {
            std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
            save((fs::path(dir) / name).string(), shards[i]);
            written.insert(name);
            for (const auto& named : shards[i]) {
                weight_map[named.first] = name;
            }
        }
        const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
        const std::string text = index.dump(2) + "\n";
        qlora::trainer::write_file_atomically(
            (fs::path(dir) / "model.safetensors.index.json").string(),
            [&](qlora::trainer::FileSink& out) { out.write(text.data(), text.size()); }
        );
        written.insert("model.safetensors.index.json");
    }
    static const std::regex kWeightFile(R"(model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors)");
    for (const auto& entry : fs::directory_iterator(dir)) {
        const std::string file = entry.path().filename().string();
        if (std::regex_match(file, kWeightFile) && written.count(file) == 0) {
            fs::remove(entry.path());
        }
    }
}

} // namespace qlora::safetensors
