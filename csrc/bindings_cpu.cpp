// neox._C_cpu: the CPU kernels of csrc/<op>/*_cpu.cpp behind the shared bindings.
#include "common/cpu_common.h"
#include "common/ops.h"

namespace neox {
NEOX_OPS(_cpu)
NEOX_RESIDUAL_OPS(_cpu)
}  // namespace neox
using neox::add3_cpu, neox::norm_dual_forward_cpu;
using neox::norm_forward_cpu, neox::norm_backward_cpu, neox::rotary_cpu, neox::rotary_qkv_cpu, neox::split_qkv_backward_cpu,
    neox::masked_softmax_forward_cpu,
    neox::masked_softmax_backward_cpu, neox::bias_gelu_forward_cpu, neox::bias_gelu_backward_cpu,
    neox::swiglu_forward_cpu, neox::swiglu_backward_cpu, neox::bias_grad_cpu, neox::cross_entropy_forward_cpu,
    neox::cross_entropy_backward_cpu;

using BF16 = neox::bf16_t;
using F16 = neox::half_t;
#define DEVICE_OK(t) ((t).device().is_cpu())
#define IMPL(fn) fn##_cpu
#define STREAM
#define GUARD(t)
#define POST_LAUNCH
#define PART_ROWS(t, N) int64_t{0}

#define NEOX_NATIVE_PARAMS 0

#include "common/bindings.inc"
