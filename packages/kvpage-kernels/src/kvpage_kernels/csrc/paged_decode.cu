// Paged attention for decode tokens (one query per sequence, at position seq_len - 1).
// Grid (num_seqs, num_q_heads), KVPAGE_WARPS warps per block. Each warp walks every
// KVPAGE_WARPS-th key of the sequence with an online softmax in fp32; lane j holds the
// dimensions j, j+32, ... of the query and of its output accumulator. The warps' states are
// merged through shared memory at the end. Cache offsets are 64-bit.
#include "convert.cuh"

#define KVPAGE_WARPS 4
#define KVPAGE_MAX_CHUNKS 8  // head_dim <= 32 * KVPAGE_MAX_CHUNKS = 256

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename C>
__device__ void paged_decode_impl(typename C::storage* out, const typename C::storage* q,
                                  const typename C::storage* k_cache,
                                  const typename C::storage* v_cache, const int* block_tables,
                                  const int* seq_lens, float scale, float softcap, int window,
                                  int num_kv_heads, int head_dim, int block_size,
                                  int max_blocks, long long stride_q_tok, long long stride_q_head,
                                  long long stride_o_tok, long long stride_o_head) {
  __shared__ float shared_max[KVPAGE_WARPS];
  __shared__ float shared_sum[KVPAGE_WARPS];
  __shared__ float shared_acc[KVPAGE_WARPS][32 * KVPAGE_MAX_CHUNKS];
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int kv_head = head / (gridDim.y / num_kv_heads);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int seq_len = seq_lens[seq];
  const int first = (window > 0 && seq_len > window) ? seq_len - window : 0;
  const int* table = block_tables + (long long)seq * max_blocks;
  const long long slot_stride = (long long)num_kv_heads * head_dim;

  float qv[KVPAGE_MAX_CHUNKS];
  float acc[KVPAGE_MAX_CHUNKS];
#pragma unroll
  for (int c = 0; c < KVPAGE_MAX_CHUNKS; ++c) {
    const int d = lane + 32 * c;
    qv[c] = d < head_dim ? C::load(q[seq * stride_q_tok + head * stride_q_head + d]) * scale : 0.f;
    acc[c] = 0.f;
  }
  float running_max = KV_NEG_INF;
  float running_sum = 0.f;
  for (int t = first + warp; t < seq_len; t += KVPAGE_WARPS) {
    const long long slot = (long long)table[t / block_size] * block_size + t % block_size;
    const long long base = slot * slot_stride + (long long)kv_head * head_dim;
    float score = 0.f;
#pragma unroll
    for (int c = 0; c < KVPAGE_MAX_CHUNKS; ++c) {
      const int d = lane + 32 * c;
      if (d < head_dim) score += qv[c] * C::load(k_cache[base + d]);
    }
    score = warp_sum(score);
    if (softcap > 0.f) score = softcap * tanhf(score / softcap);
    const float new_max = fmaxf(running_max, score);
    const float alpha = __expf(running_max - new_max);
    const float p = __expf(score - new_max);
    running_sum = running_sum * alpha + p;
#pragma unroll
    for (int c = 0; c < KVPAGE_MAX_CHUNKS; ++c) {
      const int d = lane + 32 * c;
      if (d < head_dim) acc[c] = acc[c] * alpha + p * C::load(v_cache[base + d]);
    }
    running_max = new_max;
  }
  if (lane == 0) {
    shared_max[warp] = running_max;
    shared_sum[warp] = running_sum;
  }
#pragma unroll
  for (int c = 0; c < KVPAGE_MAX_CHUNKS; ++c) shared_acc[warp][lane + 32 * c] = acc[c];
  __syncthreads();
  if (warp != 0) return;
  float top = KV_NEG_INF;
  for (int w = 0; w < KVPAGE_WARPS; ++w) top = fmaxf(top, shared_max[w]);
  float weights[KVPAGE_WARPS];
  float total = 0.f;
  for (int w = 0; w < KVPAGE_WARPS; ++w) {
    weights[w] = shared_max[w] == KV_NEG_INF ? 0.f : __expf(shared_max[w] - top);
    total += shared_sum[w] * weights[w];
  }
#pragma unroll
  for (int c = 0; c < KVPAGE_MAX_CHUNKS; ++c) {
    const int d = lane + 32 * c;
    if (d >= head_dim) continue;
    float value = 0.f;
    for (int w = 0; w < KVPAGE_WARPS; ++w) value += shared_acc[w][d] * weights[w];
    out[seq * stride_o_tok + head * stride_o_head + d] = C::store(value / total);
  }
}

#define KVPAGE_PAGED_DECODE(NAME, C)                                                        \
  extern "C" __global__ void NAME(C::storage* out, const C::storage* q,                     \
                                  const C::storage* k_cache, const C::storage* v_cache,     \
                                  const int* block_tables, const int* seq_lens, float scale, \
                                  float softcap, int window, int num_kv_heads, int head_dim, \
                                  int block_size, int max_blocks, long long stride_q_tok,   \
                                  long long stride_q_head, long long stride_o_tok,          \
                                  long long stride_o_head) {                                \
    paged_decode_impl<C>(out, q, k_cache, v_cache, block_tables, seq_lens, scale, softcap,  \
                         window, num_kv_heads, head_dim, block_size, max_blocks,            \
                         stride_q_tok, stride_q_head, stride_o_tok, stride_o_head);         \
  }

KVPAGE_PAGED_DECODE(paged_decode_fp32, Fp32)
KVPAGE_PAGED_DECODE(paged_decode_fp16, Fp16)
KVPAGE_PAGED_DECODE(paged_decode_bf16, Bf16)
