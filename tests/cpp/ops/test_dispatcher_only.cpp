// tests/cpp/ops/test_dispatcher_only.cpp: this program references no qlora symbol. It only links qlora::ops and
// finds the operators by name, as a TorchScript-loading or generic LibTorch program would. If the linker dropped
// libqlora_ops (an as-needed link without the --no-as-needed that qlora::ops carries), the lookup fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

TEST(DispatcherOnlyTest, OperatorsAreReachableByName) {
    auto& d = c10::Dispatcher::singleton();
    const auto quantize = d.findSchemaOrThrow("qlora::nf4_quantize", "")
                              .typed<std::tuple<
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor>(const at::Tensor&, int64_t, bool, const std::optional<at::Tensor>&)>();
    const at::Tensor w = at::linspace(-2, 2, 128);
    const auto [packed, absmax, nested_absmax, nested_code, offset] = quantize.call(w, 64, false, std::nullopt);
    EXPECT_EQ(packed.numel(), 64);
    EXPECT_FLOAT_EQ(absmax[0].item<float>(), 2.0f);
    EXPECT_EQ(packed[0][0].item<uint8_t>(), 0x00) << "-2 and -1.968 both map to code 0 (-1.0 * absmax)";
}
