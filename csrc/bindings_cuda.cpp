// neox._C_cuda: the CUDA kernels of csrc/<op>/*.cu behind the shared bindings (common/bindings.inc).
#include <torch/python.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers a bare toolkit lacks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/ops.h"

namespace neox {
NEOX_OPS(_cuda, , cudaStream_t stream)
NEOX_RESIDUAL_OPS(_cuda, , cudaStream_t stream)
NEOX_DUAL_NORM_BACKWARD_OPS(_cuda, , cudaStream_t stream)
}  // namespace neox
using neox::norm_dual_backward_cuda;
using neox::add3_cuda, neox::norm_dual_forward_cuda;
using neox::norm_forward_cuda, neox::norm_backward_cuda, neox::rotary_cuda, neox::rotary_qkv_cuda, neox::split_qkv_backward_cuda,
    neox::masked_softmax_forward_cuda,
    neox::masked_softmax_backward_cuda, neox::bias_gelu_forward_cuda, neox::bias_gelu_backward_cuda,
    neox::swiglu_forward_cuda, neox::swiglu_backward_cuda, neox::bias_grad_cuda, neox::cross_entropy_forward_cuda,
    neox::cross_entropy_backward_cuda;

using BF16 = __nv_bfloat16;
using F16 = __half;
#define DEVICE_OK(t) ((t).device().is_cuda())
#define IMPL(fn) fn##_cuda
#define STREAM , c10::cuda::getCurrentCUDAStream().stream()
#define GUARD(t) const c10::cuda::CUDAGuard device_guard((t).device())
#define POST_LAUNCH C10_CUDA_KERNEL_LAUNCH_CHECK()
// Partial-sum rows for the backward column reductions: about four blocks per SM.
static int64_t part_rows(const torch::Tensor& t, int64_t N) {
  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()));
  return std::min<int64_t>(N, 4 * sms);
}
#define PART_ROWS(t, N) part_rows((t), (N))

#define NEOX_NATIVE_PARAMS 1
#define NEOX_DUAL_NORM_BACKWARD 1  // bindings.inc: dual_norm's backward has a kernel here

#include "common/bindings.inc"
