// write_kv: one thread block per new token copies its K and V rows into the cache slot
// slot_mapping[token] (block_id * block_size + offset); slot -1 marks padding and is skipped.
// Only bits are copied, so one kernel per element size serves every dtype.
#include "convert.cuh"

template <typename T>
__device__ void write_kv_impl(const T* k, const T* v, T* k_cache, T* v_cache,
                              const long long* slot_mapping, long long stride_k_tok,
                              long long stride_k_head, long long stride_v_tok,
                              long long stride_v_head, int num_kv_heads, int head_dim) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const int row = num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    const int head = i / head_dim;
    const int dim = i % head_dim;
    const long long dst = slot * row + i;
    k_cache[dst] = k[token * stride_k_tok + head * stride_k_head + dim];
    v_cache[dst] = v[token * stride_v_tok + head * stride_v_head + dim];
  }
}

#define KVPAGE_WRITE_KV(NAME, T)                                                          \
  extern "C" __global__ void NAME(const T* k, const T* v, T* k_cache, T* v_cache,         \
                                  const long long* slot_mapping, long long stride_k_tok,  \
                                  long long stride_k_head, long long stride_v_tok,        \
                                  long long stride_v_head, int num_kv_heads,              \
                                  int head_dim) {                                         \
    write_kv_impl<T>(k, v, k_cache, v_cache, slot_mapping, stride_k_tok, stride_k_head,   \
                     stride_v_tok, stride_v_head, num_kv_heads, head_dim);                \
  }

KVPAGE_WRITE_KV(write_kv_16, kv_u16)
KVPAGE_WRITE_KV(write_kv_32, unsigned int)
