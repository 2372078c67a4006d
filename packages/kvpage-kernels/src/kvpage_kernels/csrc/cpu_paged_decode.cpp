// Paged decode attention for the CPU: one query token per sequence, read in place from the
// paged KV cache (no gather). Built at first use by cpu_backend.py with the system C++
// compiler (-O3 -march=native -fopenmp) and called through ctypes.
//
// Work item = (sequence, KV head): its `group` query heads share every key and value row
// they read. Scores go to a per-thread buffer, then softmax, then P @ V, all in fp32; the
// cache may be fp32 or bf16. Sequences whose query is not exactly one token are skipped
// (the caller serves them).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline void store(float* dst, float x) { *dst = x; }
inline void store(uint16_t* dst, float x) {  // round to nearest even, NaN kept a NaN
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        *dst = static_cast<uint16_t>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *dst = static_cast<uint16_t>(bits >> 16);
}

struct Problem {
    const void* q;
    int64_t q_token_stride, q_head_stride;
    void* out;
    int64_t out_token_stride, out_head_stride;
    const void* k_cache;
    const void* v_cache;
    const int32_t* block_tables;
    int64_t table_stride;
    const int32_t* seq_lens;
    const int32_t* query_start_loc;
    int32_t num_seqs, num_kv_heads, group, head_dim, block_size;
    float scale;
    int32_t window;   // 0: none
    float softcap;    // 0: none
};

// Calls fn(t, row) for the context positions t = 0 .. ctx-1 (position first + t) with a
// pointer to that position's row for `kv_head`, walking the block table block by block.
template <typename T, typename Fn>
inline void for_each_row(const Problem& p, const int32_t* table, int first, int ctx,
                         const T* cache, int kv_head, Fn fn) {
    const int64_t slot_stride = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
    int pos = first;
    int t = 0;
    while (t < ctx) {
        const int offset = pos % p.block_size;
        const int count = std::min(p.block_size - offset, ctx - t);
        const int64_t slot = static_cast<int64_t>(table[pos / p.block_size]) * p.block_size + offset;
        const T* row = cache + slot * slot_stride + static_cast<int64_t>(kv_head) * p.head_dim;
        for (int i = 0; i < count; ++i) fn(t + i, row + i * slot_stride);
        t += count;
        pos += count;
    }
}

inline void softmax(float* s, int n, float softcap) {
    if (softcap > 0.f)
        for (int t = 0; t < n; ++t) s[t] = std::tanh(s[t] / softcap) * softcap;
    float max_score = s[0];
    for (int t = 1; t < n; ++t) max_score = std::max(max_score, s[t]);
    float sum = 0.f;
    for (int t = 0; t < n; ++t) {
        s[t] = std::exp(s[t] - max_score);
        sum += s[t];
    }
    const float inv = 1.f / sum;
    for (int t = 0; t < n; ++t) s[t] *= inv;
}

// D > 0: head_dim known at compile time (fully unrolled inner loops); D == 0: p.head_dim.
template <typename T, int D>
void attend_one(const Problem& p, int seq, int kv_head, std::vector<float>& scratch) {
    const int d = D > 0 ? D : p.head_dim, groups = p.group;
    const int row = p.query_start_loc[seq];
    const int seq_len = p.seq_lens[seq];
    const int first = p.window > 0 ? std::max(0, seq_len - p.window) : 0;
    const int ctx = seq_len - first;
    if (ctx <= 0) return;
    scratch.resize(static_cast<size_t>(groups) * (ctx + 2 * d));
    float* scores = scratch.data();                                 // [group, ctx]
    float* acc = scores + static_cast<size_t>(groups) * ctx;       // [group, d]
    float* qf = acc + static_cast<size_t>(groups) * d;             // [group, d]
    const T* q = static_cast<const T*>(p.q);
    for (int g = 0; g < groups; ++g) {
        const T* qh = q + row * p.q_token_stride + (kv_head * groups + g) * p.q_head_stride;
        for (int j = 0; j < d; ++j) qf[g * d + j] = to_float(qh[j]) * p.scale;
    }
    const int32_t* table = p.block_tables + seq * p.table_stride;
    for_each_row(p, table, first, ctx, static_cast<const T*>(p.k_cache), kv_head,
                 [&](int t, const T* k) {
                     for (int g = 0; g < groups; ++g) {
                         const float* qg = qf + g * d;
                         float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                         for (int j = 0; j < d; ++j) dot += qg[j] * to_float(k[j]);
                         scores[g * ctx + t] = dot;
                     }
                 });
    for (int g = 0; g < groups; ++g) softmax(scores + g * ctx, ctx, p.softcap);
    std::fill(acc, acc + static_cast<size_t>(groups) * d, 0.f);
    for_each_row(p, table, first, ctx, static_cast<const T*>(p.v_cache), kv_head,
                 [&](int t, const T* v) {
                     for (int g = 0; g < groups; ++g) {
                         const float w = scores[g * ctx + t];
                         float* a = acc + g * d;
#pragma omp simd
                         for (int j = 0; j < d; ++j) a[j] += w * to_float(v[j]);
                     }
                 });
    T* out = static_cast<T*>(p.out);
    for (int g = 0; g < groups; ++g) {
        T* oh = out + row * p.out_token_stride + (kv_head * groups + g) * p.out_head_stride;
        for (int j = 0; j < d; ++j) store(oh + j, acc[g * d + j]);
    }
}

template <typename T, int D>
void paged_decode(const Problem& p) {
    const int items = p.num_seqs * p.num_kv_heads;
#pragma omp parallel
    {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 4)
        for (int item = 0; item < items; ++item) {
            const int seq = item / p.num_kv_heads;
            if (p.query_start_loc[seq + 1] - p.query_start_loc[seq] != 1) continue;
            attend_one<T, D>(p, seq, item % p.num_kv_heads, scratch);
        }
    }
}

template <typename T>
void dispatch_head_dim(const Problem& p) {
    switch (p.head_dim) {
        case 64: return paged_decode<T, 64>(p);
        case 128: return paged_decode<T, 128>(p);
        default: return paged_decode<T, 0>(p);
    }
}

}  // namespace

extern "C" int kvpage_paged_decode(
    int32_t dtype,  // 0: fp32, 1: bf16
    const void* q, int64_t q_token_stride, int64_t q_head_stride,
    void* out, int64_t out_token_stride, int64_t out_head_stride,
    const void* k_cache, const void* v_cache,
    const int32_t* block_tables, int64_t table_stride,
    const int32_t* seq_lens, const int32_t* query_start_loc,
    int32_t num_seqs, int32_t num_kv_heads, int32_t group, int32_t head_dim,
    int32_t block_size, float scale, int32_t window, float softcap) {
    const Problem p{q, q_token_stride, q_head_stride, out, out_token_stride, out_head_stride,
                    k_cache, v_cache, block_tables, table_stride, seq_lens, query_start_loc,
                    num_seqs, num_kv_heads, group, head_dim, block_size, scale, window,
                    softcap};
    if (dtype == 0) {
        dispatch_head_dim<float>(p);
        return 0;
    }
    if (dtype == 1) {
        dispatch_head_dim<uint16_t>(p);
        return 0;
    }
    return 1;
}
