// Declarations of the kernel launchers, one set per backend (suffix _cpu or _cuda).
// Each csrc/<op>/ file defines and instantiates its own; csrc/bindings_*.cpp call them.
// NEOX_OPS(SUFFIX, EXTRA) declares the set; EXTRA is the trailing parameter (e.g. a stream) or nothing.
// W, the norms' weight/bias type and bias_gelu's bias/dbias type: float everywhere; also the activations' type T
// on CUDA (NEOX_NATIVE_PARAMS), where the kernels read 16-bit parameters as they are.
// part/part_rows: an fp32 scratch of part_rows x (columns) for per-block partial column sums (CUDA;
// the CPU kernels ignore it and keep per-thread partials of their own).
// split_qkv_backward's strides (elements, host memory): dq's over (b, s, group, q head), then dk's and dv's
// over (b, s, group); every last dim is contiguous. version: 0 picks the kernel, 4 or 5 forces one (CUDA; tests
// and bench); returns the kernel run: 5, 4, 1 (v4's scalar form), 0 (CPU, or nothing to do), -1 (5 does not apply).
// rotary_qkv's version likewise: 0 picks, 3, 6 or 7 forces (CUDA); returns 7, 6, 3, 1 (v3's scalar form), 0, -1 (6 or 7
// does not apply: nothing launched).
#pragma once
#include <cstdint>

#define NEOX_OPS(SUFFIX, ...)                                                                            \
  template <typename T, typename W>                                                                      \
  void norm_forward##SUFFIX(const T* x, const T* residual, const W* w, const W* b, T* y, T* h,           \
                            float* mean, float* rstd, int64_t N, int64_t C, float eps, bool rms __VA_ARGS__); \
  template <typename T, typename W>                                                                      \
  void norm_backward##SUFFIX(const T* dy, const T* h, const W* w, const float* mean, const float* rstd,  \
                             const T* dh, T* dx, W* dw, W* db, float* part, int64_t part_rows, int64_t N,  \
                             int64_t C, bool rms __VA_ARGS__); \
  template <typename T>                                                                                  \
  void rotary##SUFFIX(const T* x, const float* cos, const float* sin, T* out, int64_t B, int64_t S,      \
                      int64_t H, int64_t D, int64_t R, bool interleaved, bool inverse __VA_ARGS__);       \
  template <typename T>                                                                                  \
  int rotary_qkv##SUFFIX(T* qkv, const float* cos, const float* sin, int64_t B, int64_t S, int64_t G,    \
                         int64_t P, int64_t D, int64_t R, bool interleaved, bool inverse,                 \
                         int version __VA_ARGS__);                                                        \
  template <typename T>                                                                                  \
  int split_qkv_backward##SUFFIX(const T* dq, const T* dk, const T* dv, const int64_t* strides, T* dqkv,  \
                                 const float* cos, const float* sin, int64_t B, int64_t S, int64_t G,   \
                                 int64_t P, int64_t D, int64_t R, bool interleaved, int version __VA_ARGS__); \
  template <typename T>                                                                                  \
  void masked_softmax_forward##SUFFIX(const T* x, T* y, int64_t rows, int64_t SQ, int64_t SK,            \
                                      float scale __VA_ARGS__);                                          \
  template <typename T>                                                                                  \
  void masked_softmax_backward##SUFFIX(const T* dy, const T* y, T* dx, int64_t rows, int64_t SQ,         \
                                       int64_t SK, float scale __VA_ARGS__);                             \
  template <typename T, typename W>                                                                      \
  void bias_gelu_forward##SUFFIX(const T* x, const W* bias, T* y, int64_t N, int64_t C,                  \
                                 bool tanh_approx __VA_ARGS__);                                          \
  template <typename T, typename W>                                                                      \
  void bias_gelu_backward##SUFFIX(const T* dy, const T* x, const W* bias, T* dx, W* dbias,               \
                                  float* part, int64_t part_rows, int64_t N, int64_t C,                 \
                                  bool tanh_approx __VA_ARGS__);                    \
  template <typename T>                                                                                  \
  void bias_grad##SUFFIX(const T* dy, float* dbias, float* part, int64_t part_rows, int64_t N,           \
                         int64_t C __VA_ARGS__);                                                         \
  template <typename T>                                                                                  \
  void swiglu_forward##SUFFIX(const T* x, T* y, int64_t N, int64_t F __VA_ARGS__);                       \
  template <typename T>                                                                                  \
  void swiglu_backward##SUFFIX(const T* dy, const T* x, T* dx, int64_t N, int64_t F __VA_ARGS__);        \
  template <typename T>                                                                                  \
  void cross_entropy_forward##SUFFIX(const T* logits, const int64_t* targets, float* row_max,            \
                                     float* row_sum, float* tgt_logit, int64_t N, int64_t V,             \
                                     int64_t vocab_start, int64_t ignore_index __VA_ARGS__);             \
  template <typename T>                                                                                  \
  void cross_entropy_backward##SUFFIX(T* logits, const int64_t* targets, const float* lse,               \
                                      const float* gscale, int64_t N, int64_t V, int64_t vocab_start,    \
                                      int64_t ignore_index __VA_ARGS__);

// The parallel residual's ops. csrc/residual/: out = x + a + b over n contiguous elements. csrc/norm/: both
// norms of x, y1 = norm(x; w1, b1) and y2 = norm(x; w2, b2), one set of statistics (as norm_forward's, no residual).
#define NEOX_RESIDUAL_OPS(SUFFIX, ...)                                                                   \
  template <typename T>                                                                                  \
  void add3##SUFFIX(const T* x, const T* a, const T* b, T* out, int64_t n __VA_ARGS__);                  \
  template <typename T, typename W>                                                                      \
  void norm_dual_forward##SUFFIX(const T* x, const W* w1, const W* b1, const W* w2, const W* b2, T* y1,  \
                                 T* y2, float* mean, float* rstd, int64_t N, int64_t C, float eps,       \
                                 bool rms __VA_ARGS__);

// csrc/optim/: AdamW from bf16 gradients, one span per parameter tensor (not a template: bf16 only).
// The fp32 master, exp_avg, exp_avg_sq are updated in place from g16 (null: a zero gradient) and the bf16
// weight w16 is written from the new master; step points at the tensor's fp32 step count (device memory
// on CUDA), already incremented for this step; grad_scale/found_inf are null or one fp32 value each.
struct CUstream_st;  // cudaStream_t, without the CUDA headers
namespace neox {
struct AdamwSpan {
  uint16_t* w16;
  const uint16_t* g16;
  float *master, *exp_avg, *exp_avg_sq;
  const float* step;
  int64_t n;
};
struct AdamwHyper { double lr, beta1, beta2, weight_decay, eps; };
void adamw_bf16_step_cpu(const AdamwSpan* spans, int64_t count, AdamwHyper h, const float* grad_scale,
                         const float* found_inf);
void adamw_bf16_step_cuda(const AdamwSpan* spans, int64_t count, AdamwHyper h, const float* grad_scale,
                          const float* found_inf, CUstream_st* stream);
}  // namespace neox

// csrc/norm/norm.cu, CUDA only (the CPU runs dual_norm's backward as two norm backwards): both norms' input grads of
// one x in one kernel, dx = dh + ..., and dwb = [dw1; dw2] (+ [db1; db2] with `bias`) rows of C; part: part_rows x
// 4C. Returns false, having launched nothing, for the sizes it does not take.
#define NEOX_DUAL_NORM_BACKWARD_OPS(SUFFIX, ...)                                                         \
  template <typename T, typename W>                                                                      \
  bool norm_dual_backward##SUFFIX(const T* dy1, const T* dy2, const T* h, const W* w1, const W* w2,       \
                                  const float* mean, const float* rstd, const T* dh, T* dx, W* dwb,       \
                                  float* part, int64_t part_rows, int64_t N, int64_t C, bool rms,         \
                                  bool bias __VA_ARGS__);

// csrc/fp8/: torchao's tensorwise fp8 cast of a bf16 tensor (bits as uint16), in two launches and no host sync.
// fp8_amax writes nparts (= fp8_amax_parts(n)) partial max|x| of x's n values (n % 8 == 0); fp8_cast reduces them to
// the scale, writes x [R, C] (R, C % 16 == 0) as e4m3fn or e5m2 into out [R, C] and/or out_t [C, R] (null: not
// wanted; one at least), scale and inv_scale = 1 / scale.
namespace neox {
int fp8_amax_parts_cpu(int64_t n);
void fp8_amax_cpu(const uint16_t* x, int64_t n, float* parts, int nparts);
void fp8_cast_cpu(const uint16_t* x, int64_t R, int64_t C, const float* parts, int nparts, bool e5m2, uint8_t* out,
                  uint8_t* out_t, float* scale, float* inv_scale);
int fp8_amax_parts_cuda(int64_t n);
void fp8_amax_cuda(const uint16_t* x, int64_t n, float* parts, int nparts, CUstream_st* stream);
void fp8_cast_cuda(const uint16_t* x, int64_t R, int64_t C, const float* parts, int nparts, bool e5m2, uint8_t* out,
                   uint8_t* out_t, float* scale, float* inv_scale, CUstream_st* stream);
}  // namespace neox
