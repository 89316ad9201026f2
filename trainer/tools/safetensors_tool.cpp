// trainer/tools/safetensors_tool.cpp: `qlora_safetensors check FILE` validates a file with qlora's reader and prints
// its tensors; `qlora_safetensors copy IN OUT` reads every tensor and writes them with qlora's writer. Exit status 1
// and a one-line message on stderr for a rejected file. Used by tests/python/test_safetensors_interop.py to compare
// qlora's reader and writer with the reference `safetensors` package in both directions.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qlora/trainer/safetensors.h"

namespace st = qlora::safetensors;

int main(int argc, char** argv) {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (!((cmd == "check" && argc == 3) || (cmd == "copy" && argc == 4))) {
        std::fprintf(stderr, "usage: qlora_safetensors check FILE | copy IN OUT\n");
        return 2;
    }
    try {
        const st::File f = st::File::open(argv[2]);
        if (cmd == "check") {
            for (const st::TensorInfo& t : f.header().tensors) {
                std::printf("%s %s [", t.name.c_str(), st::dtype_name(t.dtype));
                for (size_t i = 0; i < t.shape.size(); ++i) {
                    std::printf("%s%lld", i ? "," : "", static_cast<long long>(t.shape[i]));
                }
                std::printf("]\n");
            }
            return 0;
        }
        std::vector<std::pair<std::string, at::Tensor>> tensors;
        for (const st::TensorInfo& t : f.header().tensors) {
            tensors.emplace_back(t.name, f.tensor(t.name));
        }
        std::map<std::string, std::string> metadata = f.header().metadata;
        st::save(argv[3], tensors, metadata);
        return 0;
    } catch (const st::SafetensorsError& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
}
