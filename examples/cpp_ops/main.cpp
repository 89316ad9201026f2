// examples/cpp_ops/main.cpp: quantize a weight to NF4 with qlora's C++ API, dequantize it, and report the error.
#include <cstdio>

#include <ATen/ATen.h>

#include "qlora/ops.h"

int main() {
    at::manual_seed(0);
    const at::Tensor w = at::randn({4096, 4096}); // a Llama-7B-sized projection, float32
    const qlora::Nf4Tensor q = qlora::nf4_quantize(w, /*blocksize=*/64, /*double_quant=*/true);
    const at::Tensor back = qlora::nf4_dequantize(q);
    const int64_t bytes =
        q.packed.nbytes() + q.absmax.nbytes() + q.nested_absmax.nbytes() + q.nested_code.nbytes() + q.offset.nbytes();
    const double mean_abs_err = (w - back).abs().mean().item<double>();
    std::printf("cpu isa: %s\n", qlora::cpu_isa().c_str());
    std::printf(
        "weight %lld x %lld float32: %.1f MiB -> NF4 %.2f MiB (%.4f bits/param)\n", static_cast<long long>(w.size(0)),
        static_cast<long long>(w.size(1)), w.nbytes() / 1048576.0, bytes / 1048576.0, 8.0 * bytes / w.numel()
    );
    std::printf(
        "mean |w - dequant(quant(w))| = %.5f (bitsandbytes publishes 0.0728 for N(0,1), blocksize 64)\n", mean_abs_err
    );
    if (back.sizes() != w.sizes() || mean_abs_err > 0.075) {
        std::printf("round trip FAILED\n");
        return 1;
    }
    std::printf("round trip ok\n");
    return 0;
}
