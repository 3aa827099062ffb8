// Cross-entropy on CUDA over logits in their own dtype (no fp32 copy). Math as cross_entropy_cpu.cpp.
// v1: one block per row. Forward: one sweep of 16-byte packs; each thread keeps a running (max, sum-exp)
// updated once per pack (one rescale per pack, not per element), merged across the block. Backward
// overwrites the row with (softmax - onehot) * gscale in one read + one write.
#include "../common/cuda_common.cuh"

namespace neox {

template <typename T, int V>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                                             float* __restrict__ row_max, float* __restrict__ row_sum,
                                             float* __restrict__ tgt_logit, int64_t Vocab, int64_t vocab_start,
                                             int64_t ignore_index) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * Vocab;
  float m = -INFINITY, s = 0.f, v[V];
  for (int64_t j = threadIdx.x * V; j < Vocab; j += blockDim.x * V) {
    load<T, V>(xr + j, v);
    float pm = v[0];
#pragma unroll
    for (int i = 1; i < V; i++) pm = fmaxf(pm, v[i]);
    const float nm = fmaxf(m, pm);
    float ps = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) ps += expf(v[i] - nm);
    s = s * expf(m - nm) + ps;
    m = nm;
  }
  const float gm = block_max(m, scratch);
  const float gs = block_sum(m == -INFINITY ? 0.f : s * expf(m - gm), scratch);
  if (threadIdx.x == 0) {
    const int64_t t = targets[row], local = t - vocab_start;
    row_max[row] = gm;
    row_sum[row] = gs;
    tgt_logit[row] = (t != ignore_index && local >= 0 && local < Vocab) ? to_f(xr[local]) : 0.f;
  }
}

template <typename T, int V>
__global__ void cross_entropy_backward_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
                                              const float* __restrict__ lse, const float* __restrict__ gscale,
                                              int64_t Vocab, int64_t vocab_start, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  T* xr = logits + row * Vocab;
  const int64_t t = targets[row], local = t - vocab_start;
  const bool ignored = t == ignore_index;
  const float l = lse[row], g = *gscale;
  float v[V];
  for (int64_t j = threadIdx.x * V; j < Vocab; j += blockDim.x * V) {
    load<T, V>(xr + j, v);
#pragma unroll
    for (int i = 0; i < V; i++) v[i] = ignored ? 0.f : (expf(v[i] - l) - (j + i == local ? 1.f : 0.f)) * g;
    store<T, V>(xr + j, v);
  }
}

template <typename T>
void cross_entropy_forward_cuda(const T* logits, const int64_t* targets, float* row_max, float* row_sum,
                                float* tgt_logit, int64_t N, int64_t Vocab, int64_t vocab_start, int64_t ignore_index,
                                cudaStream_t stream) {
  const int vec = pack_width<T>(Vocab, {logits});
  NEOX_WITH_PACK(T, vec, {
    cross_entropy_forward_kernel<T, V><<<N, row_threads(Vocab / V, 512), 0, stream>>>(
        logits, targets, row_max, row_sum, tgt_logit, Vocab, vocab_start, ignore_index);
  });
}

template <typename T>
void cross_entropy_backward_cuda(T* logits, const int64_t* targets, const float* lse, const float* gscale, int64_t N,
                                 int64_t Vocab, int64_t vocab_start, int64_t ignore_index, cudaStream_t stream) {
  const int vec = pack_width<T>(Vocab, {logits});
  NEOX_WITH_PACK(T, vec, {
    cross_entropy_backward_kernel<T, V><<<N, row_threads(Vocab / V, 512), 0, stream>>>(
        logits, targets, lse, gscale, Vocab, vocab_start, ignore_index);
  });
}

#define INSTANTIATE(T)                                                                                         \
  template void cross_entropy_forward_cuda<T>(const T*, const int64_t*, float*, float*, float*, int64_t, int64_t, \
                                              int64_t, int64_t, cudaStream_t);                                  \
  template void cross_entropy_backward_cuda<T>(T*, const int64_t*, const float*, const float*, int64_t, int64_t,  \
                                               int64_t, int64_t, cudaStream_t);
NEOX_FOR_EACH_CUDA_DTYPE(INSTANTIATE)

}  // namespace neox
