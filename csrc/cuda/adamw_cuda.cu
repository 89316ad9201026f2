// csrc/cuda/adamw_cuda.cu: CUDA kernels of qlora::adamw8bit_step, qlora::adamw32bit_step and the paging ops (ATen
// layer).
//
// The optimizer steps validate arguments (adamw_checks.h, the same messages as the CPU), compute the per-step
// constants once on the host (core::adamw_scalars) and launch the kernels of adamw_kernels.cuh on the current stream.
// Paged state is CUDA managed memory (cudaMallocManaged), which the driver may evict to host RAM under memory
// pressure and pages back on access; paged_prefetch moves it back ahead of the step where the device supports it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../adamw_checks.h"
#include "adamw_kernels.cuh"
#include "cuda_element.h"

namespace qlora::cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

void adamw8bit_step_cuda(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& state1, at::Tensor& state2, at::Tensor& absmax1,
    at::Tensor& absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2, int64_t step, double lr, double beta1,
    double beta2, double eps, double weight_decay
) {
    adamw8_check_args(
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, step, lr, beta1, beta2, eps, weight_decay
    );
    check_cuda(param, "qlora::adamw8bit_step", "param"); // the checks above put every other tensor on its device
    const c10::cuda::CUDAGuard guard(param.device());
    const core::AdamwScalars s = core::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(param.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        using E = cuda_element_t<T>;
        adamw8_launch<E>(adamw8_params<E>(param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, s), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adamw32bit_step_cuda(
    at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, int64_t step, double lr,
    double beta1, double beta2, double eps, double weight_decay
) {
    adamw32_check_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay);
    check_cuda(param, "qlora::adamw32bit_step", "param");
    const c10::cuda::CUDAGuard guard(param.device());
    const core::AdamwScalars s = core::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    visit_float_dtype(param.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        using E = cuda_element_t<T>;
        adamw32_launch<E>(adamw32_params<E>(param, grad, exp_avg, exp_avg_sq, s), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Managed memory, zeroed on the current stream (so ordered before every kernel later queued there), released by the
// tensor's deleter with cudaFree, which synchronizes with the device first. A deleter must not throw, hence the
// warning-only check there.
at::Tensor paged_zeros_cuda(const at::Tensor& like, at::ScalarType dtype) {
    check_cuda(like, "qlora::paged_zeros", "like");
    const c10::cuda::CUDAGuard guard(like.device());
    const at::TensorOptions options = like.options().dtype(dtype);
    const size_t nbytes = static_cast<size_t>(like.numel()) * c10::elementSize(dtype);
    if (nbytes == 0) {
        return at::empty(like.sizes(), options); // cudaMallocManaged rejects a size of 0
    }
    void* data = nullptr;
    C10_CUDA_CHECK(cudaMallocManaged(&data, nbytes, cudaMemAttachGlobal));
    at::Tensor out = at::from_blob(
        data, like.sizes(), [](void* ptr) { C10_CUDA_CHECK_WARN(cudaFree(ptr)); }, options, like.device()
    ); // owns the memory from here on, also if the memset below fails
    C10_CUDA_CHECK(cudaMemsetAsync(data, 0, nbytes, c10::cuda::getCurrentCUDAStream()));
    return out;
}

// Prefetches the bytes the tensor spans to its device, if the device can (cudaDevAttrConcurrentManagedAccess) and
// the memory is managed; a no-op otherwise (ordinary device memory is already there).
void paged_prefetch_cuda(const at::Tensor& state) {
    check_cuda(state, "qlora::paged_prefetch", "state");
    const c10::cuda::CUDAGuard guard(state.device());
    const int device = state.device().index();
    int concurrent = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device));
    const void* data = state.is_contiguous() ? state.const_data_ptr() : state.storage().data();
    const size_t nbytes = state.is_contiguous() ? state.nbytes() : state.storage().nbytes();
    if (concurrent == 0 || data == nullptr || nbytes == 0) {
        return;
    }
    cudaPointerAttributes attributes{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, data));
    if (attributes.type != cudaMemoryTypeManaged) {
        return;
    }
    cudaMemLocation location{};
    location.type = cudaMemLocationTypeDevice;
    location.id = device;
    C10_CUDA_CHECK(cudaMemPrefetchAsync(data, nbytes, location, /*flags=*/0, c10::cuda::getCurrentCUDAStream()));
}

} // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
    m.impl("adamw8bit_step", &adamw8bit_step_cuda);
    m.impl("adamw32bit_step", &adamw32bit_step_cuda);
    m.impl("paged_zeros", &paged_zeros_cuda);
    m.impl("paged_prefetch", &paged_prefetch_cuda);
}

} // namespace qlora::cuda
