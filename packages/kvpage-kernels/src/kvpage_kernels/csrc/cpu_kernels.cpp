// CPU kernels, built at first use by cpu_backend.py with the system C++ compiler
// (-O3 -fopenmp -ffp-contract=off, -march for one CPU tier) and called through ctypes. The
// tier decides which paths are compiled: AVX-512 or AVX2+FMA vector paths where the build
// targets them (see "vector lanes"), portable loops for everything else.
//
// kvpage_paged_attention: paged causal attention of every query row (decode tokens and
// prefill chunks alike), read in place from the paged KV cache (no gather).
// kvpage_write_kv: this step's K/V rows into their slots (any dtype: rows are copied as
// bytes). Work item = (block of consecutive query rows of a sequence, KV heads): the rows'
// query heads of a KV head's group share every key and value row they read. Scores, softmax
// and P @ V all in fp32; the cache may be fp32 or bf16.

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <omp.h>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// An IEEE half (fp16): the scales and offsets of low-bit weights where they are exact in it.
struct Half {
    uint16_t bits;
};
inline float to_float(Half h) {  // exact
#if defined(__F16C__)
    return _cvtsh_ss(h.bits);
#else
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    const uint32_t exponent = h.bits >> 10 & 0x1fu, mantissa = h.bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa 2^-24
        const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
        return sign ? -magnitude : magnitude;
    }
    const uint32_t bits = sign | (exponent == 0x1fu ? 0x7f800000u : (exponent + 112) << 23) |
                          mantissa << 13;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

inline void store(float* dst, float x) { *dst = x; }
inline uint16_t to_bf16(float x) {  // round to nearest even, NaN kept a NaN (branch-free)
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
inline void store(uint16_t* dst, float x) { *dst = to_bf16(x); }

// v rounded to T and read back (identity for float): where an unfused torch op would round.
template <typename T>
inline float rounded(float v) {
    T r;
    store(&r, v);
    return to_float(r);
}

// Calls fn with a null T* for the element type `dtype` names (0: fp32, 1: bf16, stored as
// uint16_t); returns 0, or 1 for a dtype the kernels do not know.
template <typename Fn>
int with_dtype(int32_t dtype, Fn fn) {
    if (dtype == 0) {
        fn(static_cast<float*>(nullptr));
        return 0;
    }
    if (dtype == 1) {
        fn(static_cast<uint16_t*>(nullptr));
        return 0;
    }
    return 1;
}

// exp(x), vectorizable (std::exp is a scalar call): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// its degree-6 Taylor polynomial (relative error below 2e-7 there), 2^n put into the exponent
// bits. x is clamped to [-87, 88], so tiny results flush to about 1.6e-38 and 0 never appears.
inline float fast_exp(float x) {
    x = std::min(std::max(x, -87.f), 88.f);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two parts
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// ---- vector lanes ---------------------------------------------------------------------------
//
// The vector paths are written once against `Simd`, the widest fp32 vector of the CPU tier
// the library is built for: 16 lanes with AVX-512 (F, BW, VL, DQ), 8 with AVX2 and FMA.
// bf16 is loaded by widening to 32 bits and shifting left 16, and stored rounded to nearest
// even in integer ops with NaN kept a NaN, exactly as to_bf16 (and torch) round. Without
// either (the scalar tier) KVPAGE_SIMD is undefined and the portable loops serve every op.

#if defined(__AVX512F__)
#define KVPAGE_SIMD 1

struct Simd {
    using V = __m512;
    using Lanes = __mmask16;  // which lanes a partial load or store touches
    static constexpr int width = 16;

    static V set1(float x) { return _mm512_set1_ps(x); }
    static V zero() { return _mm512_setzero_ps(); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V min(V a, V b) { return _mm512_min_ps(a, b); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
    static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
    static V round(V x) {
        return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    static V times_pow2(V x, V n) { return _mm512_scalef_ps(x, n); }  // x 2^n, n integral
    static float sum(V x) { return _mm512_reduce_add_ps(x); }
    static float max_lane(V x) { return _mm512_reduce_max_ps(x); }
    static unsigned nan_lanes(V x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
    static unsigned equal_lanes(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }

    static V load(const float* src) { return _mm512_loadu_ps(src); }
    static V load(const Half* src) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    }
    static V load(const uint16_t* src) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    static void store(float* dst, V x) { _mm512_storeu_ps(dst, x); }
    static void store(uint16_t* dst, V x) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(bf16_bits(x)));
    }
    static V round_bf16(V x) {  // x rounded to bf16, as fp32
        return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16));
    }

    static Lanes first(int n) {  // the lanes below n
        return n >= width ? static_cast<Lanes>(0xffff) : static_cast<Lanes>((1u << n) - 1u);
    }
    static V load(const float* src, Lanes lanes, float fill) {
        return _mm512_mask_loadu_ps(set1(fill), lanes, src);
    }
    static void store(float* dst, Lanes lanes, V x) { _mm512_mask_storeu_ps(dst, lanes, x); }
    static V keep(Lanes lanes, V x) { return _mm512_maskz_mov_ps(lanes, x); }  // others 0

    // The first n (< width) values at src, zeros in the other lanes; the first n lanes to dst.
    static V load_first(const float* src, int n) { return load(src, first(n), 0.f); }
    static V load_first(const uint16_t* src, int n) {
        const __m256i half = _mm256_maskz_loadu_epi16(first(n), src);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    static void store_first(float* dst, int n, V x) { store(dst, first(n), x); }
    static void store_first(uint16_t* dst, int n, V x) {
        _mm256_mask_storeu_epi16(dst, first(n), _mm512_cvtepi32_epi16(bf16_bits(x)));
    }

    // Lane j = the sum of the lanes of p[j], for the width vectors p[0 .. width), in one tree
    // of adds: pairs of vectors fold their halves, then their quarters, then lanes in 128-bit
    // groups. The tree leaves input k's sum in lane 4 (k % 4) + k / 4, so p[j] goes in there.
    static V sums(const V* p) {
        const auto in = [p](int k) { return p[4 * (k % 4) + k / 4]; };
        V halves[8], quarters[4], pairs[2];
        for (int k = 0; k < 8; ++k) {
            const V a = in(2 * k), b = in(2 * k + 1);
            halves[k] = add(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
        }
        for (int k = 0; k < 4; ++k) {
            const V a = halves[2 * k], b = halves[2 * k + 1];
            quarters[k] = add(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
        }
        for (int k = 0; k < 2; ++k) {
            const V a = quarters[2 * k], b = quarters[2 * k + 1];
            pairs[k] = add(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
        }
        return add(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88),
                   _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD));
    }

    // 32-bit integer lanes, the words of packed low-bit codes
    using Words = __m512i;
    static Words load_words(const uint32_t* src) { return _mm512_loadu_si512(src); }
    static Words shift_left(Words w, int bits) { return _mm512_slli_epi32(w, bits); }
    static Words shift_right(Words w, int bits) { return _mm512_srli_epi32(w, bits); }
    static V float_of_bits(Words w, uint32_t mask, uint32_t ones) {  // bits (w & mask) | ones
        const __m512i m = _mm512_set1_epi32(static_cast<int32_t>(mask));
        const __m512i o = _mm512_set1_epi32(static_cast<int32_t>(ones));
        return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(w, m, o, 0xEA));  // (a & b) | c
    }

  private:
    static __m512i bf16_bits(V x) {  // to_bf16 of each lane, in its low 16 bits
        const __m512i bits = _mm512_castps_si512(x);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
        const __m512i quiet_nan =
            _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
        return _mm512_mask_blend_epi32(nan_lanes(x), rounded, quiet_nan);
    }
};

#elif defined(__AVX2__) && defined(__FMA__)
#define KVPAGE_SIMD 1

struct Simd {
    using V = __m256;
    using Lanes = __m256i;  // all ones in each lane a partial load or store touches
    static constexpr int width = 8;

    static V set1(float x) { return _mm256_set1_ps(x); }
    static V zero() { return _mm256_setzero_ps(); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V min(V a, V b) { return _mm256_min_ps(a, b); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
    static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
    static V round(V x) {
        return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    static V times_pow2(V x, V n) {  // x 2^n, n integral in [-126, 127]: n put into the exponent
        const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        return _mm256_mul_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
    }
    static float sum(V x) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static float max_lane(V x) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    }
    static unsigned nan_lanes(V x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
    static unsigned equal_lanes(V a, V b) {
        return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ));
    }

    static V load(const float* src) { return _mm256_loadu_ps(src); }
    static V load(const Half* src) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    }
    static V load(const uint16_t* src) {
        const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    static void store(float* dst, V x) { _mm256_storeu_ps(dst, x); }
    static void store(uint16_t* dst, V x) {
        const __m256i half = bf16_bits(x);
        const __m128i packed =  // each lane < 2^16: the unsigned saturation never clips
            _mm_packus_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
    }
    static V round_bf16(V x) {  // x rounded to bf16, as fp32
        return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16));
    }

    static Lanes first(int n) {  // the lanes below n
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static V load(const float* src, Lanes lanes, float fill) {
        return _mm256_blendv_ps(set1(fill), _mm256_maskload_ps(src, lanes),
                                _mm256_castsi256_ps(lanes));
    }
    static void store(float* dst, Lanes lanes, V x) { _mm256_maskstore_ps(dst, lanes, x); }
    static V keep(Lanes lanes, V x) { return _mm256_and_ps(_mm256_castsi256_ps(lanes), x); }

    // The first n (< width) values at src, zeros in the other lanes; the first n lanes to dst
    // (bf16 through a buffer: AVX2 has no 16-bit masked loads and stores).
    static V load_first(const float* src, int n) { return load(src, first(n), 0.f); }
    static V load_first(const uint16_t* src, int n) {
        uint16_t buffer[width] = {};
        std::memcpy(buffer, src, n * sizeof(uint16_t));
        return load(buffer);
    }
    static void store_first(float* dst, int n, V x) { store(dst, first(n), x); }
    static void store_first(uint16_t* dst, int n, V x) {
        uint16_t buffer[width];
        store(buffer, x);
        std::memcpy(dst, buffer, n * sizeof(uint16_t));
    }

    // Lane j = the sum of the lanes of p[j], for the width vectors p[0 .. width), in one tree
    // of adds: pairs of vectors fold their 128-bit halves, then lanes within the halves. The
    // tree leaves input k's sum in lane 4 (k % 2) + k / 2, so p[j] goes in there.
    static V sums(const V* p) {
        V halves[4], pairs[2];
        for (int k = 0; k < 4; ++k) {  // inputs 2k and 2k + 1: p[k] and p[k + 4]
            const V a = p[k], b = p[k + 4];
            halves[k] = add(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
        }
        for (int k = 0; k < 2; ++k) {
            const V a = halves[2 * k], b = halves[2 * k + 1];
            pairs[k] = add(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE));
        }
        return add(_mm256_shuffle_ps(pairs[0], pairs[1], 0x88),
                   _mm256_shuffle_ps(pairs[0], pairs[1], 0xDD));
    }

    // 32-bit integer lanes, the words of packed low-bit codes
    using Words = __m256i;
    static Words load_words(const uint32_t* src) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    }
    static Words shift_left(Words w, int bits) { return _mm256_slli_epi32(w, bits); }
    static Words shift_right(Words w, int bits) { return _mm256_srli_epi32(w, bits); }
    static V float_of_bits(Words w, uint32_t mask, uint32_t ones) {  // bits (w & mask) | ones
        const __m256i m = _mm256_set1_epi32(static_cast<int32_t>(mask));
        const __m256i o = _mm256_set1_epi32(static_cast<int32_t>(ones));
        return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(w, m), o));
    }

  private:
    static __m256i bf16_bits(V x) {  // to_bf16 of each lane, in its low 16 bits
        const __m256i bits = _mm256_castps_si256(x);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
        const __m256i quiet_nan =
            _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        return _mm256_blendv_epi8(rounded, quiet_nan, nan);
    }
};
#endif

#if defined(KVPAGE_SIMD)
// fast_exp on every lane (with FMA steps).
inline Simd::V exp_lanes(Simd::V x) {
    x = Simd::max(Simd::min(x, Simd::set1(88.f)), Simd::set1(-87.f));
    const Simd::V n = Simd::round(Simd::mul(x, Simd::set1(1.44269504088896341f)));
    Simd::V r = Simd::fnmadd(n, Simd::set1(0.693359375f), x);
    r = Simd::fmadd(n, Simd::set1(2.12194440e-4f), r);
    Simd::V poly = Simd::set1(1.f / 720.f);
    for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
        poly = Simd::fmadd(poly, r, Simd::set1(c));
    return Simd::times_pow2(poly, n);
}

// rounded<T> on every lane.
template <typename T>
inline Simd::V rounded_lanes(Simd::V x) {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        return Simd::round_bf16(x);
    }
}
#endif

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

// Context rows fetched ahead of the ones attended: blocks lie anywhere in the pool (and one
// KV head's rows a slot apart), so the hardware's stream prefetchers lose the stream at every
// block's end. Fetching the next layer's context rows into L2 while this layer's GEMMs
// compute, so that attention would find them in L3, made 16-sequence decode steps 7 to 18%
// slower on AMD Zen 3 (median 49.1 ms a step without, 52.4 to 58.0 with), presumably because
// the rows left the caches before attention came to them and were read twice.
constexpr int kRowsAhead = 16;

// The rows at consecutive context positions of a sequence, from `pos` on, for KV heads
// first_head .. first_head + heads - 1 (side by side in a slot): take() returns the next
// position's row of first_head, walking the block table, and prefetches the row kRowsAhead
// positions further while one of the `count` positions remains there.
template <typename T>
class ContextRows {
  public:
    ContextRows(const Problem& p, const int32_t* table, const void* cache, int first_head,
                int heads, int pos, int count)
        : next_(p, table, cache, first_head, pos),
          ahead_(next_),
          bytes_(heads * p.head_dim * static_cast<int>(sizeof(T))),
          unfetched_(count) {
        for (int t = 0; t < kRowsAhead; ++t) fetch_ahead();
    }

    const T* take() {
        const T* row = next_.row();
        next_.advance();
        fetch_ahead();
        return row;
    }

  private:
    struct Position {  // a position's row, by block and offset in the block table
        Position(const Problem& p, const int32_t* table, const void* cache, int first_head,
                 int pos)
            : table(table),
              base(static_cast<const T*>(cache) + static_cast<int64_t>(first_head) * p.head_dim),
              slot_stride(static_cast<int64_t>(p.num_kv_heads) * p.head_dim),
              block_size(p.block_size),
              block(pos / p.block_size),
              offset(pos % p.block_size) {}
        const T* row() const {
            return base + (static_cast<int64_t>(table[block]) * block_size + offset) * slot_stride;
        }
        void advance() {
            if (++offset == block_size) {
                offset = 0;
                ++block;
            }
        }
        const int32_t* table;
        const T* base;
        int64_t slot_stride;
        int block_size, block, offset;
    };

    void fetch_ahead() {
        if (unfetched_ == 0) return;
        const char* at = reinterpret_cast<const char*>(ahead_.row());
        for (int b = 0; b < bytes_; b += 64) __builtin_prefetch(at + b);
        ahead_.advance();
        --unfetched_;
    }

    Position next_, ahead_;
    int bytes_, unfetched_;
};

// Calls fn(t, row) for the context positions t = 0 .. ctx-1 (position first + t) with a
// pointer to that position's row for `kv_head`.
template <typename T, typename Fn>
inline void for_each_row(const Problem& p, const int32_t* table, int first, int ctx,
                         const T* cache, int kv_head, Fn fn) {
    ContextRows<T> rows(p, table, cache, kv_head, 1, first, ctx);
    for (int t = 0; t < ctx; ++t) fn(t, rows.take());
}

// The d values at src as fp32: src itself for fp32, else converted once into buf.
template <typename T>
inline const float* as_floats(const T* src, float* buf, int d) {
    if constexpr (std::is_same_v<T, float>) {
        return src;
    } else {
#pragma omp simd
        for (int j = 0; j < d; ++j) buf[j] = to_float(src[j]);
        return buf;
    }
}

inline void softmax(float* s, int n, float softcap) {
    if (softcap > 0.f)
        for (int t = 0; t < n; ++t) s[t] = std::tanh(s[t] / softcap) * softcap;
    float max_score = s[0];
#pragma omp simd reduction(max : max_score)
    for (int t = 1; t < n; ++t) max_score = std::max(max_score, s[t]);
#pragma omp simd
    for (int t = 0; t < n; ++t) s[t] = fast_exp(s[t] - max_score);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; ++t) sum += s[t];
    const float inv = 1.f / sum;
#pragma omp simd
    for (int t = 0; t < n; ++t) s[t] *= inv;
}

// One query row of a sequence and the context it attends: positions first .. end - 1, its
// own position end - 1 the last (causal), first = end - window with a sliding window.
struct Query {
    int seq, row, first, end;
    int context() const { return end - first; }
};

// Consecutive query rows row .. row + count - 1 of a sequence, at positions end - 1 ..
// end + count - 2 (row i's context ends at end + i).
struct QueryBlock {
    int seq, row, count, end, window;
    Query at(int i) const {
        const int last = end + i;
        return {seq, row + i, window > 0 ? std::max(0, last - window) : 0, last};
    }
    int context() const { return at(count - 1).end - at(0).first; }
};

// D > 0: head_dim known at compile time (fully unrolled inner loops); D == 0: p.head_dim.
template <typename T, int D>
void attend_head(const Problem& p, const Query& query, int kv_head,
                 std::vector<float>& scratch) {
    const int d = D > 0 ? D : p.head_dim, groups = p.group;
    const int row = query.row, first = query.first, ctx = query.context();
    if (ctx <= 0) return;
    scratch.resize(static_cast<size_t>(groups) * (ctx + 2 * d) + d);
    float* scores = scratch.data();                                 // [group, ctx]
    float* acc = scores + static_cast<size_t>(groups) * ctx;       // [group, d]
    float* qf = acc + static_cast<size_t>(groups) * d;             // [group, d]
    float* row_buf = qf + static_cast<size_t>(groups) * d;         // [d]
    const T* q = static_cast<const T*>(p.q);
    for (int g = 0; g < groups; ++g) {
        const T* qh = q + row * p.q_token_stride + (kv_head * groups + g) * p.q_head_stride;
        for (int j = 0; j < d; ++j) qf[g * d + j] = to_float(qh[j]) * p.scale;
    }
    const int32_t* table = p.block_tables + query.seq * p.table_stride;
    for_each_row(p, table, first, ctx, static_cast<const T*>(p.k_cache), kv_head,
                 [&](int t, const T* k_row) {
                     const float* k = as_floats(k_row, row_buf, d);
                     for (int g = 0; g < groups; ++g) {
                         const float* qg = qf + g * d;
                         float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                         for (int j = 0; j < d; ++j) dot += qg[j] * k[j];
                         scores[g * ctx + t] = dot;
                     }
                 });
    for (int g = 0; g < groups; ++g) softmax(scores + g * ctx, ctx, p.softcap);
    std::fill(acc, acc + static_cast<size_t>(groups) * d, 0.f);
    for_each_row(p, table, first, ctx, static_cast<const T*>(p.v_cache), kv_head,
                 [&](int t, const T* v_row) {
                     const float* v = as_floats(v_row, row_buf, d);
                     for (int g = 0; g < groups; ++g) {
                         const float w = scores[g * ctx + t];
                         float* a = acc + g * d;
#pragma omp simd
                         for (int j = 0; j < d; ++j) a[j] += w * v[j];
                     }
                 });
    T* out = static_cast<T*>(p.out);
    for (int g = 0; g < groups; ++g) {
        T* oh = out + row * p.out_token_stride + (kv_head * groups + g) * p.out_head_stride;
        for (int j = 0; j < d; ++j) store(oh + j, acc[g * d + j]);
    }
}

// The portable loops' attention, a row and a KV head at a time.
template <typename T, int D>
void attend_one(const Problem& p, const QueryBlock& block, int first_head, int heads,
                std::vector<float>& scratch) {
    for (int i = 0; i < block.count; ++i)
        for (int kv_head = first_head; kv_head < first_head + heads; ++kv_head)
            attend_head<T, D>(p, block.at(i), kv_head, scratch);
}

// Query rows of a sequence that share one pass over their context: a prefill chunk's rows
// go in blocks of this many, so that each key and value row read from the cache serves the
// query heads of all of them.
constexpr int kRowsPerBlock = 4;

// Blocks per OpenMP thread from which an item is a whole block, all its KV heads.
constexpr int kBlocksPerThread = 4;

// Every query row of the problem in blocks, the longest contexts first: sequence s's rows
// query_start_loc[s] .. query_start_loc[s + 1] - 1 sit at its last positions, up to
// seq_lens[s] - 1 (rows before position 0, in malformed input, are left out).
std::vector<QueryBlock> query_blocks(const Problem& p) {
    std::vector<QueryBlock> blocks;
    for (int seq = 0; seq < p.num_seqs; ++seq) {
        const int begin = p.query_start_loc[seq], rows = p.query_start_loc[seq + 1] - begin;
        const int first_end = p.seq_lens[seq] - rows + 1;  // the first row's context end
        for (int i = std::max(0, 1 - first_end); i < rows; i += kRowsPerBlock)
            blocks.push_back({seq, begin + i, std::min(kRowsPerBlock, rows - i), first_end + i,
                              p.window});
    }
    std::stable_sort(blocks.begin(), blocks.end(), [](const QueryBlock& a, const QueryBlock& b) {
        return a.context() > b.context();
    });
    return blocks;
}

// Runs attend(p, block, first_head, heads, scratch) for every block of query rows on OpenMP
// threads, each with its own scratch buffer, taking an item at a time as it finishes its last
// (items differ in context length). An item is a whole block, all its KV heads, when there
// are blocks enough to keep every thread busy (a position's heads lie side by side: one
// stretch of memory to read), else one KV head of a block.
template <typename Attend>
void for_each_item(const Problem& p, Attend attend) {
    const std::vector<QueryBlock> blocks = query_blocks(p);
    const int count = static_cast<int>(blocks.size());
    const bool whole = count >= kBlocksPerThread * omp_get_max_threads();
    const int heads = whole ? p.num_kv_heads : 1, parts = p.num_kv_heads / heads;
    const int items = count * parts;
#pragma omp parallel
    {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < items; ++item)
            attend(p, blocks[item / parts], item % parts * heads, heads, scratch);
    }
}

#if defined(KVPAGE_SIMD)
// Context positions whose scores are all taken before the softmax's running maximum and
// total are updated: the update (a maximum, a rescale when it grows, the exp in one tight
// loop) is paid once per this many positions instead of once per vector of them. (On AMD
// Zen 3, prefill chunks after a long context ran 15 to 20% faster than with an update per
// vector, decode no slower.)
constexpr int kSlice = 64;

// scores [W] = the dot products of query [D] with the chunk's W rows (each `offset` values
// into its row), side by side: a chain of FMAs per row, folded into one vector.
template <typename T, int D>
inline void chunk_scores(const float* query, const T* const* rows, int offset, float* scores) {
    constexpr int W = Simd::width, C = D / W;
    Simd::V dots[W];
    for (int j = 0; j < W; ++j) dots[j] = Simd::zero();
    for (int c = 0; c < C; ++c) {
        const Simd::V qc = Simd::load(query + c * W);
        for (int j = 0; j < W; ++j)
            dots[j] = Simd::fmadd(qc, Simd::load(rows[j] + offset + c * W), dots[j]);
    }
    Simd::store(scores, Simd::sums(dots));
}

// One query head's online softmax over a slice: w [from, to) holds the scores of lanes lo ..
// hi - 1 (the others are not the row's); they become weights e^(score - running max), 0
// outside lo .. hi - 1, the output acc [D] and total rescaled when the maximum grows.
template <int D>
inline void softmax_update(float* w, int lo, int hi, float softcap, float& running_max,
                           float& total, float* acc) {
    constexpr int W = Simd::width, C = D / W;
    const int from = lo / W * W, to = (hi + W - 1) / W * W;
    if (softcap > 0.f)
        for (int t = lo; t < hi; ++t) w[t] = std::tanh(w[t] / softcap) * softcap;
    std::fill(w + from, w + lo, -INFINITY);
    std::fill(w + hi, w + to, -INFINITY);
    Simd::V top = Simd::load(w + from);
    for (int t = from + W; t < to; t += W) top = Simd::max(top, Simd::load(w + t));
    const float slice_max = Simd::max_lane(top);
    if (slice_max > running_max) {  // the earlier terms shrink by e^(old - new)
        const float shrink = std::exp(running_max - slice_max);
        const Simd::V by = Simd::set1(shrink);
        for (int c = 0; c < C; ++c)
            Simd::store(acc + c * W, Simd::mul(Simd::load(acc + c * W), by));
        total *= shrink;
        running_max = slice_max;
    }
    const Simd::V max = Simd::set1(running_max);
    for (int t = from; t < to; t += W)
        Simd::store(w + t, exp_lanes(Simd::sub(Simd::load(w + t), max)));
    std::fill(w + from, w + lo, 0.f);
    std::fill(w + hi, w + to, 0.f);
    Simd::V sum = Simd::load(w + from);
    for (int t = from + W; t < to; t += W) sum = Simd::add(sum, Simd::load(w + t));
    total += Simd::sum(sum);
}

// acc [D] += the sum over rows j = from .. to - 1 of w[j] times rows[j] (each `offset` values
// in), the accumulators in registers, at most 8 vectors at a time.
template <typename T, int D>
inline void add_weighted_rows(const float* w, const T* const* rows, int from, int to,
                              int offset, float* acc) {
    constexpr int W = Simd::width, C = D / W, CV = C < 8 ? C : 8;
    static_assert(C % CV == 0, "the output accumulators go in equal parts");
    for (int c0 = 0; c0 < C; c0 += CV) {
        Simd::V sums[CV];
        for (int c = 0; c < CV; ++c) sums[c] = Simd::load(acc + (c0 + c) * W);
        for (int j = from; j < to; ++j) {
            const Simd::V weight = Simd::set1(w[j]);
            const T* v = rows[j] + offset + c0 * W;
            for (int c = 0; c < CV; ++c)
                sums[c] = Simd::fmadd(weight, Simd::load(v + c * W), sums[c]);
        }
        for (int c = 0; c < CV; ++c) Simd::store(acc + (c0 + c) * W, sums[c]);
    }
}

// Attention of a block of query rows, their heads on KV heads first_head .. first_head +
// heads - 1 (head_dim D known at compile time), in a single pass over the block's context, a
// slice of kSlice positions at a time, with the softmax kept online: a running maximum and
// total per query head of each row, the output rescaled when the maximum grows. In a slice,
// the scores and then the weighted sums of V go a chunk of Simd::width positions at a time
// over every query head of every row: a chunk's K or V rows are read from memory once (the
// heads of a position lie side by side: one stretch of memory) and serve all of them from L1.
// A chunk's dot products run side by side (a chain of FMAs per position) and fold into one
// vector of scores; a query head's output accumulators stay in registers (at most 8 vectors at
// a time) while the chunk's V rows are added in. (A query head at a time over the whole
// slice, its accumulators in registers throughout, made Llama-3-8B's decode, 32 query heads of
// 128 values, 30% slower: each head then reads the slice's V rows from L2.) A row takes the
// positions of its own context alone, the others masked: each row's result is the one it
// would get in a block of its own.
template <typename T, int D>
void attend_lanes(const Problem& p, const QueryBlock& block, int first_head, int heads,
                  std::vector<float>& scratch) {
    constexpr int W = Simd::width, C = D / W;
    static_assert(kSlice % W == 0, "a slice is whole chunks");
    const int group = p.group, row_heads = heads * group, query_heads = block.count * row_heads;
    const int first = block.at(0).first, ctx = block.context();
    if (ctx <= 0) return;
    scratch.resize(static_cast<size_t>(query_heads) * (2 * D + 2 + kSlice));
    float* queries = scratch.data();                                  // [query_heads, D], scaled
    float* acc = queries + static_cast<size_t>(query_heads) * D;      // [query_heads, D]
    float* running_max = acc + static_cast<size_t>(query_heads) * D;  // [query_heads]
    float* total = running_max + query_heads;                         // [query_heads]
    float* weights = total + query_heads;                             // [query_heads, kSlice]
    const T* q = static_cast<const T*>(p.q);
    const Simd::V scale = Simd::set1(p.scale);
    for (int h = 0; h < query_heads; ++h) {  // query head h: row h / row_heads of the block
        const int row = block.row + h / row_heads, head = first_head * group + h % row_heads;
        const T* qh = q + row * p.q_token_stride + head * p.q_head_stride;
        for (int c = 0; c < C; ++c)
            Simd::store(queries + h * D + c * W, Simd::mul(Simd::load(qh + c * W), scale));
        running_max[h] = -INFINITY;
        total[h] = 0.f;
    }
    std::fill(acc, acc + static_cast<size_t>(query_heads) * D, 0.f);
    const int32_t* table = p.block_tables + block.seq * p.table_stride;
    ContextRows<T> keys(p, table, p.k_cache, first_head, heads, first, ctx);
    ContextRows<T> values(p, table, p.v_cache, first_head, heads, first, ctx);
    const T* k_rows[kSlice];  // first_head's rows; head first_head + i's lie i D further
    const T* v_rows[kSlice];
    int lo[kRowsPerBlock], hi[kRowsPerBlock];  // row i's positions in the slice: lo .. hi - 1
    for (int s0 = 0; s0 < ctx; s0 += kSlice) {
        const int n = std::min(kSlice, ctx - s0), padded = (n + W - 1) / W * W;
        for (int j = 0; j < padded; ++j) {  // a partial last chunk repeats its last row
            k_rows[j] = j < n ? keys.take() : k_rows[n - 1];
            v_rows[j] = j < n ? values.take() : v_rows[n - 1];
        }
        for (int i = 0; i < block.count; ++i) {
            const Query row = block.at(i);
            lo[i] = std::clamp(row.first - first - s0, 0, n);
            hi[i] = std::clamp(row.end - first - s0, 0, n);
        }
        // The scores, a chunk at a time over the query heads of the rows it concerns (query
        // head h of row i reads KV head (h - i * row_heads) / group: `offset` values in).
        for (int t0 = 0; t0 < padded; t0 += W)
            for (int i = 0; i < block.count; ++i) {
                if (t0 >= hi[i] || t0 + W <= lo[i]) continue;
                for (int h = i * row_heads, offset = 0; offset < heads * D; offset += D)
                    for (int g = 0; g < group; ++g, ++h)
                        chunk_scores<T, D>(queries + h * D, k_rows + t0, offset,
                                           weights + h * kSlice + t0);
            }
        for (int i = 0; i < block.count; ++i)
            if (lo[i] < hi[i])
                for (int h = i * row_heads; h < (i + 1) * row_heads; ++h)
                    softmax_update<D>(weights + h * kSlice, lo[i], hi[i], p.softcap,
                                      running_max[h], total[h], acc + h * D);
        // The weighted sums of the V rows, a chunk at a time likewise.
        for (int t0 = 0; t0 < padded; t0 += W)
            for (int i = 0; i < block.count; ++i) {
                const int from = std::max(t0, lo[i]), to = std::min(t0 + W, hi[i]);
                if (from >= to) continue;
                for (int h = i * row_heads, offset = 0; offset < heads * D; offset += D)
                    for (int g = 0; g < group; ++g, ++h)
                        add_weighted_rows<T, D>(weights + h * kSlice, v_rows, from, to, offset,
                                                acc + h * D);
            }
    }
    T* out = static_cast<T*>(p.out);
    for (int h = 0; h < query_heads; ++h) {
        const int row = block.row + h / row_heads, head = first_head * group + h % row_heads;
        T* oh = out + row * p.out_token_stride + head * p.out_head_stride;
        const Simd::V inv = Simd::set1(1.f / total[h]);
        for (int c = 0; c < C; ++c)
            Simd::store(oh + c * W, Simd::mul(Simd::load(acc + h * D + c * W), inv));
    }
}

// True when a vector path served the problem: head_dim a multiple of the vector width.
template <typename T, int D>
bool paged_attention_fast(const Problem& p) {
    if constexpr (D % Simd::width != 0) {
        return false;
    } else {
        for_each_item(p, attend_lanes<T, D>);
        return true;
    }
}
#else
template <typename T, int D>
bool paged_attention_fast(const Problem&) { return false; }
#endif

template <typename T, int D>
void paged_attention(const Problem& p) {
    for_each_item(p, attend_one<T, D>);
}

template <typename T>
void dispatch_head_dim(const Problem& p) {
    switch (p.head_dim) {
        case 64:
            if (!paged_attention_fast<T, 64>(p)) paged_attention<T, 64>(p);
            return;
        case 128:
            if (!paged_attention_fast<T, 128>(p)) paged_attention<T, 128>(p);
            return;
        case 256:  // Gemma
            if (!paged_attention_fast<T, 256>(p)) paged_attention<T, 256>(p);
            return;
        default: return paged_attention<T, 0>(p);
    }
}

}  // namespace

// fp32 lanes of the vector paths this build holds: 16 (AVX-512), 8 (AVX2), 1 (none).
extern "C" int kvpage_vector_width() {
#if defined(KVPAGE_SIMD)
    return Simd::width;
#else
    return 1;
#endif
}

extern "C" int kvpage_paged_attention(
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
    return with_dtype(dtype, [&](auto* tag) {
        dispatch_head_dim<std::remove_pointer_t<decltype(tag)>>(p);
    });
}

// k/v rows [tokens, heads, head_dim] (element strides given; head_dim contiguous) go to
// cache slot slot_mapping[i] (skipped when negative) of caches [num_slots, heads, head_dim].
// Returns -1, or the first token whose slot is past the cache (then nothing is written).
extern "C" int64_t kvpage_write_kv(const char* k, int64_t k_token_stride, int64_t k_head_stride,
                                   const char* v, int64_t v_token_stride, int64_t v_head_stride,
                                   char* k_cache, char* v_cache, const int64_t* slot_mapping,
                                   int64_t tokens, int64_t num_slots, int64_t heads,
                                   int64_t head_dim, int64_t element_size) {
    for (int64_t i = 0; i < tokens; ++i)
        if (slot_mapping[i] >= num_slots) return i;
    const int64_t row_bytes = head_dim * element_size;
    for (int64_t i = 0; i < tokens; ++i) {
        const int64_t slot = slot_mapping[i];
        if (slot < 0) continue;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t dst = (slot * heads + h) * row_bytes;
            std::memcpy(k_cache + dst, k + (i * k_token_stride + h * k_head_stride) * element_size,
                        row_bytes);
            std::memcpy(v_cache + dst, v + (i * v_token_stride + h * v_head_stride) * element_size,
                        row_bytes);
        }
    }
    return -1;
}

// Rotary embedding, half-rotation layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) over the
// first 2 * half of each head's head_dim values, the rest copied (partial rotary), each
// product and sum rounded to T as the unfused torch ops round (built without FMA contraction,
// so fp32 results are bit-identical too). x [tokens, heads, head_dim] with element strides;
// cos/sin rows [tokens, half] at cs_stride; out contiguous.
template <typename T>
void rotary(const T* x, int64_t x_token_stride, int64_t x_head_stride, const T* cos,
            const T* sin, int64_t cs_stride, T* out, int64_t tokens, int64_t heads,
            int64_t head_dim, int64_t half) {
#pragma omp parallel for schedule(dynamic) if (tokens * heads * half > (1 << 15))
    for (int64_t i = 0; i < tokens; ++i) {
        const T* c = cos + i * cs_stride;
        const T* s = sin + i * cs_stride;
        for (int64_t h = 0; h < heads; ++h) {
            const T* x1 = x + i * x_token_stride + h * x_head_stride;
            const T* x2 = x1 + half;
            T* o = out + (i * heads + h) * head_dim;
#pragma omp simd
            for (int64_t j = 0; j < half; ++j) {
                const float a = to_float(x1[j]), b = to_float(x2[j]);
                const float cj = to_float(c[j]), sj = to_float(s[j]);
                store(o + j, rounded<T>(a * cj) - rounded<T>(b * sj));
                store(o + half + j, rounded<T>(b * cj) + rounded<T>(a * sj));
            }
            std::copy(x1 + 2 * half, x1 + head_dim, o + 2 * half);
        }
    }
}

extern "C" int kvpage_rotary(int32_t dtype, const void* x, int64_t x_token_stride,
                             int64_t x_head_stride, const void* cos, const void* sin,
                             int64_t cs_stride, void* out, int64_t tokens, int64_t heads,
                             int64_t head_dim, int64_t half) {
    return with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        rotary(static_cast<const T*>(x), x_token_stride, x_head_stride, static_cast<const T*>(cos),
               static_cast<const T*>(sin), cs_stride, static_cast<T*>(out), tokens, heads,
               head_dim, half);
    });
}

// ---- greedy sampling ------------------------------------------------------------------------

// Index of the first maximum of row[0..cols) (a NaN counts as the maximum, as in torch.max).
template <typename T>
int64_t argmax_row(const T* row, int64_t cols) {
    float best = to_float(row[0]);
    bool nan = false;
    int64_t j = 0;
#if defined(KVPAGE_SIMD)
    Simd::V best_lanes = Simd::set1(best);
    unsigned unordered = 0;
    for (; j + Simd::width <= cols; j += Simd::width) {
        const Simd::V v = Simd::load(row + j);
        best_lanes = Simd::max(best_lanes, v);
        unordered |= Simd::nan_lanes(v);
    }
    best = Simd::max_lane(best_lanes);
    nan = unordered != 0;
#endif
    for (; j < cols; ++j) {
        const float v = to_float(row[j]);
        best = std::max(best, v);
        nan = nan || v != v;
    }
    int64_t i = 0;
#if defined(KVPAGE_SIMD)
    const Simd::V target = Simd::set1(best);
    for (; i + Simd::width <= cols; i += Simd::width) {
        const Simd::V v = Simd::load(row + i);
        const unsigned hit = nan ? Simd::nan_lanes(v) : Simd::equal_lanes(v, target);
        if (hit) return i + __builtin_ctz(hit);
    }
#endif
    for (; i < cols; ++i) {
        const float v = to_float(row[i]);
        if (nan ? v != v : v == best) return i;
    }
    return 0;
}

// out[r] = argmax_row of row r, rows on OpenMP threads.
template <typename T>
void argmax_rows(const T* x, int64_t row_stride, int64_t* out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(dynamic) if (rows * cols > (1 << 17))
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * row_stride, cols);
}

extern "C" int kvpage_argmax(int32_t dtype, const void* x, int64_t row_stride, int64_t* out,
                             int64_t rows, int64_t cols) {
    return with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        argmax_rows(static_cast<const T*>(x), row_stride, out, rows, cols);
    });
}

// ---- routing tokens to experts ---------------------------------------------------------------

// Whether probability a ranks above b: the larger, a NaN above any number (as torch.topk).
inline bool ranks_above(float a, float b) { return a > b || (a != a && b == b); }

// One row of router logits [experts]: softmax in fp32 into probs, then the top_k largest
// probabilities in descending order (ties: the lower expert first) into weights and ids,
// renormalized to sum to 1 when `normalize` (each divided by their sum, added in order).
template <typename T>
void route_row(const T* logits, int64_t experts, int64_t top_k, bool normalize, float* probs,
               float* weights, int64_t* ids) {
    float max_logit = to_float(logits[0]);
    for (int64_t e = 1; e < experts; ++e) max_logit = std::max(max_logit, to_float(logits[e]));
    float sum = 0.f;
    for (int64_t e = 0; e < experts; ++e) {
        probs[e] = std::exp(to_float(logits[e]) - max_logit);
        sum += probs[e];
    }
    for (int64_t e = 0; e < experts; ++e) probs[e] /= sum;
    for (int64_t c = 0; c < top_k; ++c) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; ++e) {
            const bool taken = std::find(ids, ids + c, e) != ids + c;
            if (!taken && (best < 0 || ranks_above(probs[e], probs[best]))) best = e;
        }
        ids[c] = best;
        weights[c] = probs[best];
    }
    if (!normalize) return;
    float total = 0.f;
    for (int64_t c = 0; c < top_k; ++c) total += weights[c];
    for (int64_t c = 0; c < top_k; ++c) weights[c] /= total;
}

// route_row for each of `rows` rows of logits (row_stride apart) into weights and ids
// [rows, top_k]; probs: scratch of `experts` floats.
template <typename T>
void route_rows(const T* logits, int64_t row_stride, int64_t rows, int64_t experts,
                int64_t top_k, bool normalize, float* probs, float* weights, int64_t* ids) {
    for (int64_t r = 0; r < rows; ++r)
        route_row(logits + r * row_stride, experts, top_k, normalize, probs, weights + r * top_k,
                  ids + r * top_k);
}

extern "C" int kvpage_route_experts(int32_t dtype, const void* logits, int64_t row_stride,
                                    int64_t rows, int64_t experts, int64_t top_k,
                                    int32_t normalize, float* weights, int64_t* ids) {
    std::vector<float> probs(experts);
    return with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        route_rows(static_cast<const T*>(logits), row_stride, rows, experts, top_k,
                   normalize != 0, probs.data(), weights, ids);
    });
}

// ---- elementwise ops of a Llama layer, rounding to T where the unfused torch ops round -----
//
// A row runs in whole vectors where the build has vector lanes; the rest of it (all of it on
// the scalar tier) element by element, with the same formula. Rows go to OpenMP threads one at
// a time as each finishes its last (here and in rotary and argmax): a thread that the rest of
// the machine pauses (a server's HTTP thread, another process) then holds up no other.

// sum[j] = round(x[j] + residual[j])
template <typename T>
void add_rounded(const T* x, const T* residual, T* sum, int64_t n) {
    int64_t j = 0;
#if defined(KVPAGE_SIMD)
    for (; j + Simd::width <= n; j += Simd::width)
        Simd::store(sum + j, Simd::add(Simd::load(x + j), Simd::load(residual + j)));
#endif
#pragma omp simd
    for (int64_t i = j; i < n; ++i) store(sum + i, to_float(x[i]) + to_float(residual[i]));
}

// The sum of s[j]^2, in fp32.
template <typename T>
float sum_of_squares(const T* s, int64_t n) {
    float total = 0.f;
    int64_t j = 0;
#if defined(KVPAGE_SIMD)
    Simd::V partial = Simd::zero();
    for (; j + Simd::width <= n; j += Simd::width) {
        const Simd::V v = Simd::load(s + j);
        partial = Simd::add(partial, Simd::mul(v, v));
    }
    total = Simd::sum(partial);
#endif
#pragma omp simd reduction(+ : total)
    for (int64_t i = j; i < n; ++i) total += to_float(s[i]) * to_float(s[i]);
    return total;
}

// out[j] = round(weight[j] * round(s[j] * inv))
template <typename T>
void scale_rounded(const T* s, float inv, const T* weight, T* out, int64_t n) {
    int64_t j = 0;
#if defined(KVPAGE_SIMD)
    const Simd::V inv_lanes = Simd::set1(inv);
    for (; j + Simd::width <= n; j += Simd::width) {
        const Simd::V normed = rounded_lanes<T>(Simd::mul(Simd::load(s + j), inv_lanes));
        Simd::store(out + j, Simd::mul(Simd::load(weight + j), normed));
    }
#endif
#pragma omp simd
    for (int64_t i = j; i < n; ++i)
        store(out + i, to_float(weight[i]) * rounded<T>(to_float(s[i]) * inv));
}

// out = round(weight * round(s * rsqrt(mean(s^2) + eps))) with s = round(x + residual) (or x),
// statistics in fp32; with a residual, the sum s is also written to sum_out.
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride,
              const T* weight, T* out, T* sum_out, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(dynamic) if (rows * hidden > (1 << 15))
    for (int64_t r = 0; r < rows; ++r) {
        const T* s = x + r * x_stride;
        if (residual != nullptr) {
            T* sum_row = sum_out + r * hidden;
            add_rounded(s, residual + r * residual_stride, sum_row, hidden);
            s = sum_row;
        }
        const float mean_square = sum_of_squares(s, hidden) / static_cast<float>(hidden);
        scale_rounded(s, 1.f / std::sqrt(mean_square + eps), weight, out + r * hidden, hidden);
    }
}

extern "C" int kvpage_rms_norm(int32_t dtype, const void* x, int64_t x_stride,
                               const void* residual, int64_t residual_stride, const void* weight,
                               void* out, void* sum_out, int64_t rows, int64_t hidden, float eps) {
    return with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        rms_norm(static_cast<const T*>(x), x_stride, static_cast<const T*>(residual),
                 residual_stride, static_cast<const T*>(weight), static_cast<T*>(out),
                 static_cast<T*>(sum_out), rows, hidden, eps);
    });
}

// The gated MLP's activations: SiLU, g / (1 + exp(-g)); GELU with the tanh approximation,
// 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), computed as g e / (1 + e) with
// e = exp(2u), without the cancellation in 1 + tanh(u) (which torch's fp32 result carries:
// it is off by up to about 1e-4 relative where tanh(u) nears -1, this by a few ulps).
constexpr int32_t kSilu = 0;
constexpr int32_t kGeluTanh = 1;
constexpr float kTwoSqrtTwoOverPi = 1.5957691216057308f;
constexpr float kGeluCubic = 0.044715f;

template <int32_t A>
inline float activation(float g) {
    if constexpr (A == kSilu) return g / (1.f + fast_exp(-g));
    const float two_u = kTwoSqrtTwoOverPi * (g * (1.f + kGeluCubic * g * g));
    const float e = fast_exp(two_u);
    return g * (e / (1.f + e));
}

#if defined(KVPAGE_SIMD)
template <int32_t A>
inline Simd::V activation_lanes(Simd::V g) {
    const Simd::V one = Simd::set1(1.f);
    if constexpr (A == kSilu)
        return Simd::div(g, Simd::add(one, exp_lanes(Simd::sub(Simd::zero(), g))));
    const Simd::V cubic = Simd::fmadd(Simd::mul(g, g), Simd::set1(kGeluCubic), one);
    const Simd::V two_u = Simd::mul(Simd::set1(kTwoSqrtTwoOverPi), Simd::mul(g, cubic));
    const Simd::V e = exp_lanes(two_u);
    return Simd::mul(g, Simd::div(e, Simd::add(one, e)));
}
#endif

// out[j] = round(round(act(gate[j])) * up[j])
template <typename T, int32_t A>
void act_times(const T* gate, const T* up, T* out, int64_t n) {
    int64_t j = 0;
#if defined(KVPAGE_SIMD)
    for (; j + Simd::width <= n; j += Simd::width) {
        const Simd::V act = activation_lanes<A>(Simd::load(gate + j));
        Simd::store(out + j, Simd::mul(rounded_lanes<T>(act), Simd::load(up + j)));
    }
#endif
#pragma omp simd
    for (int64_t i = j; i < n; ++i)
        store(out + i, rounded<T>(activation<A>(to_float(gate[i]))) * to_float(up[i]));
}

// act_times of each row x = [gate | up], 2 * inner wide, into out [rows, inner].
template <typename T, int32_t A>
void act_and_mul(const T* x, int64_t x_stride, T* out, int64_t rows, int64_t inner) {
#pragma omp parallel for schedule(dynamic) if (rows * inner > (1 << 15))
    for (int64_t r = 0; r < rows; ++r) {
        const T* gate = x + r * x_stride;
        act_times<T, A>(gate, gate + inner, out + r * inner, inner);
    }
}

template <int32_t A>
int act_and_mul_entry(int32_t dtype, const void* x, int64_t x_stride, void* out, int64_t rows,
                      int64_t inner) {
    return with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        act_and_mul<T, A>(static_cast<const T*>(x), x_stride, static_cast<T*>(out), rows, inner);
    });
}

extern "C" int kvpage_silu_and_mul(int32_t dtype, const void* x, int64_t x_stride, void* out,
                                   int64_t rows, int64_t inner) {
    return act_and_mul_entry<kSilu>(dtype, x, x_stride, out, rows, inner);
}

extern "C" int kvpage_gelu_tanh_and_mul(int32_t dtype, const void* x, int64_t x_stride,
                                        void* out, int64_t rows, int64_t inner) {
    return act_and_mul_entry<kGeluTanh>(dtype, x, x_stride, out, rows, inner);
}

// ---- multi-LoRA: each row of a batch through its own adapter (Punica's BGMV) --------------
//
// lora_shrink: h[t] = A_s x[t] (h fp32 [rows, rank]), lora_expand: out[t] += B_s h[t], with
// A_s = a[s] [rank, depth] and B_s = b[s] [n, rank] the adapter of row t's slot s; rows whose
// slot is -1 cost nothing (shrink writes their zeros). Work items are (block of ranks, row) and
// (chunk of outputs, row), the rows grouped by slot, so that a thread's consecutive items read
// the same block of one adapter, which stays in cache. With vector lanes each output is one
// FMA chain per lane over its inputs in order, its lanes then summed in a fixed tree (expand
// sums a vector of outputs' lanes at once: Simd::sums); on the scalar tier, one simd
// reduction. The same instructions whatever the batch: a row's results do not depend on the
// other rows.

namespace {

// Below this many multiply-adds a call runs on one thread.
constexpr int64_t kLoraParallelWork = int64_t{1} << 16;

// order = the rows whose slot is not -1, grouped by slot (row order within a slot). Returns -1,
// or the first row whose slot lies outside [-1, num_slots) (then order is left unset).
int64_t rows_by_slot(const int32_t* slots, int64_t rows, int64_t num_slots,
                     std::vector<int64_t>& order) {
    std::vector<int64_t> next(num_slots, 0);  // rows per slot, then where its next row goes
    for (int64_t t = 0; t < rows; ++t) {
        if (slots[t] < -1 || slots[t] >= num_slots) return t;
        if (slots[t] >= 0) ++next[slots[t]];
    }
    int64_t total = 0;
    for (int64_t& at : next) total += std::exchange(at, total);
    order.resize(total);
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] >= 0) order[next[slots[t]]++] = t;
    return -1;
}

// Ranks of a shrink item: 8 FMA chains share each vector of x.
constexpr int kRankBlock = 8;

// h[j] = sum over i of x[i] a_j[i] for the `count` (1 .. kRankBlock) rows a_j = a + j depth.
template <typename T>
void shrink_ranks(const T* x, const T* a, int64_t depth, int count, float* h) {
#if defined(KVPAGE_SIMD)
    const T* rows[kRankBlock];  // past count, the last row again (its sums dropped)
    for (int j = 0; j < kRankBlock; ++j) rows[j] = a + std::min(j, count - 1) * depth;
    Simd::V acc[kRankBlock];
    for (Simd::V& v : acc) v = Simd::zero();
    int64_t i = 0;
    for (; i + Simd::width <= depth; i += Simd::width) {
        const Simd::V xv = Simd::load(x + i);
        for (int j = 0; j < kRankBlock; ++j)
            acc[j] = Simd::fmadd(xv, Simd::load(rows[j] + i), acc[j]);
    }
    if (i < depth) {
        const int tail = static_cast<int>(depth - i);
        const Simd::V xv = Simd::load_first(x + i, tail);
        for (int j = 0; j < kRankBlock; ++j)
            acc[j] = Simd::fmadd(xv, Simd::load_first(rows[j] + i, tail), acc[j]);
    }
    for (int j = 0; j < count; ++j) h[j] = Simd::sum(acc[j]);
#else
    for (int j = 0; j < count; ++j) {
        const T* row = a + j * depth;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < depth; ++i) sum += to_float(x[i]) * to_float(row[i]);
        h[j] = sum;
    }
#endif
}

// h [rows, rank] = x [rows, depth] (rows x_stride apart) times each row's A^T, a [num_slots,
// rank, depth]; zeros for rows whose slot is -1. Returns -1, or the first row whose slot lies
// outside [-1, num_slots) (then nothing is written).
template <typename T>
int64_t lora_shrink(const T* x, int64_t x_stride, const T* a, const int32_t* slots, float* h,
                    int64_t rows, int64_t num_slots, int64_t rank, int64_t depth) {
    std::vector<int64_t> order;
    const int64_t bad = rows_by_slot(slots, rows, num_slots, order);
    if (bad >= 0) return bad;
    for (int64_t t = 0; t < rows; ++t)
        if (slots[t] < 0) std::fill(h + t * rank, h + (t + 1) * rank, 0.f);
    const int64_t active = static_cast<int64_t>(order.size());
    const int64_t items = (rank + kRankBlock - 1) / kRankBlock * active;
#pragma omp parallel for schedule(static) if (active * rank * depth > kLoraParallelWork)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t t = order[item % active], first = item / active * kRankBlock;
        const T* block = a + (static_cast<int64_t>(slots[t]) * rank + first) * depth;
        shrink_ranks(x + t * x_stride, block, depth,
                     static_cast<int>(std::min<int64_t>(kRankBlock, rank - first)),
                     h + t * rank + first);
    }
    return -1;
}

// Outputs of an expand item: a multiple of 16 near 4,096 / rank, so that the item's block of
// B (16 KB in fp32) stays in L1 while the rows of its slot take their turns.
inline int64_t expand_chunk(int64_t rank) {
    return std::max<int64_t>(16, 4096 / std::max<int64_t>(rank, 1) / 16 * 16);
}

#if defined(KVPAGE_SIMD)
// Lanes that sum to h . b: products summed over the rank a vector of lanes at a time.
template <typename T>
inline Simd::V dot_lanes(const float* h, const T* b, int64_t rank) {
    Simd::V acc = Simd::zero();
    int64_t r = 0;
    for (; r + Simd::width <= rank; r += Simd::width)
        acc = Simd::fmadd(Simd::load(h + r), Simd::load(b + r), acc);
    if (r < rank) {
        const int tail = static_cast<int>(rank - r);
        acc = Simd::fmadd(Simd::load_first(h + r, tail), Simd::load_first(b + r, tail), acc);
    }
    return acc;
}

// Likewise for a rank of C vectors, h already in registers (zeros past the rank), `tail` the
// ranks in the last vector (width if Whole): the same sums, with no loop and h loaded once.
template <int C, bool Whole, typename T>
inline Simd::V dot_lanes(const Simd::V (&h)[C], const T* b, int tail) {
    Simd::V acc = Simd::zero();
    for (int c = 0; c + 1 < C; ++c) acc = Simd::fmadd(h[c], Simd::load(b + c * Simd::width), acc);
    const T* last = b + (C - 1) * Simd::width;
    return Simd::fmadd(h[C - 1], Whole ? Simd::load(last) : Simd::load_first(last, tail), acc);
}

// out[j] = round(out[j] + sum of the lanes of dot(b + j rank)) for the `count` outputs j, a
// vector of outputs at a time, whose dots' lanes are summed together (Simd::sums).
template <typename T, typename Dot>
void add_dots(const T* b, int64_t rank, int64_t count, T* out, Dot dot) {
    constexpr int W = Simd::width;
    Simd::V dots[W];
    int64_t first = 0;
    for (; first + W <= count; first += W) {
        for (int j = 0; j < W; ++j) dots[j] = dot(b + (first + j) * rank);
        Simd::store(out + first, Simd::add(Simd::load(out + first), Simd::sums(dots)));
    }
    if (first < count) {  // the last outputs: past them, the last one's dot again (dropped)
        const int n = static_cast<int>(count - first);
        for (int j = 0; j < W; ++j) dots[j] = dot(b + (first + std::min(j, n - 1)) * rank);
        T* dst = out + first;
        Simd::store_first(dst, n, Simd::add(Simd::load_first(dst, n), Simd::sums(dots)));
    }
}

// add_dots for a rank of C vectors, h kept in registers.
template <int C, bool Whole, typename T>
void expand_in_registers(const float* h, const T* b, int64_t rank, int64_t count, T* out) {
    const int tail = static_cast<int>(rank - (C - 1) * Simd::width);
    Simd::V hv[C];
    for (int c = 0; c + 1 < C; ++c) hv[c] = Simd::load(h + c * Simd::width);
    const float* last = h + (C - 1) * Simd::width;
    hv[C - 1] = Whole ? Simd::load(last) : Simd::load_first(last, tail);
    add_dots(b, rank, count, out,
             [&](const T* row) { return dot_lanes<C, Whole>(hv, row, tail); });
}

// expand_in_registers for a rank of C vectors, the last one whole or not.
template <int C, typename T>
void expand_rank_vectors(const float* h, const T* b, int64_t rank, int64_t count, T* out) {
    if (rank % Simd::width == 0) {
        expand_in_registers<C, true>(h, b, rank, count, out);
    } else {
        expand_in_registers<C, false>(h, b, rank, count, out);
    }
}
#endif

// out[j] = round(out[j] + h . b_j) for the `count` outputs j of a chunk, b_j = b + j rank (with
// vector lanes: ranks of up to 4 vectors with h in registers, longer ones looping over h).
template <typename T>
void expand_outputs(const float* h, const T* b, int64_t rank, int64_t count, T* out) {
#if defined(KVPAGE_SIMD)
    switch ((rank + Simd::width - 1) / Simd::width) {
        case 1: return expand_rank_vectors<1>(h, b, rank, count, out);
        case 2: return expand_rank_vectors<2>(h, b, rank, count, out);
        case 3: return expand_rank_vectors<3>(h, b, rank, count, out);
        case 4: return expand_rank_vectors<4>(h, b, rank, count, out);
        default:
            return add_dots(b, rank, count, out,
                            [&](const T* row) { return dot_lanes(h, row, rank); });
    }
#else
    for (int64_t j = 0; j < count; ++j) {
        const T* row = b + j * rank;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < rank; ++r) sum += h[r] * to_float(row[r]);
        store(out + j, to_float(out[j]) + sum);
    }
#endif
}

// out [rows, n] (rows out_stride apart) += h [rows, rank] (rows h_stride apart) times each
// row's B^T, b [num_slots, n, rank], summed in fp32 and rounded once to T; rows whose slot is
// -1 are not touched. Returns -1, or the first row whose slot lies outside [-1, num_slots)
// (then nothing is written).
template <typename T>
int64_t lora_expand(T* out, int64_t out_stride, const float* h, int64_t h_stride, const T* b,
                    const int32_t* slots, int64_t rows, int64_t num_slots, int64_t n,
                    int64_t rank) {
    std::vector<int64_t> order;
    const int64_t bad = rows_by_slot(slots, rows, num_slots, order);
    if (bad >= 0) return bad;
    const int64_t active = static_cast<int64_t>(order.size()), chunk = expand_chunk(rank);
    const int64_t items = (n + chunk - 1) / chunk * active;
#pragma omp parallel for schedule(static) if (active * n * rank > kLoraParallelWork)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t t = order[item % active], first = item / active * chunk;
        const T* block = b + (static_cast<int64_t>(slots[t]) * n + first) * rank;
        expand_outputs(h + t * h_stride, block, rank, std::min(chunk, n - first),
                       out + t * out_stride + first);
    }
    return -1;
}

}  // namespace

// lora_shrink in fp32 (dtype 0) or bf16 (1): x and a in that dtype, h fp32 [rows, rank]
// contiguous, slots int32 [rows]. Returns -1, -2 for an unknown dtype, or the first row whose
// slot lies outside [-1, num_slots).
extern "C" int64_t kvpage_lora_shrink(int32_t dtype, const void* x, int64_t x_stride,
                                      const void* a, const int32_t* slots, float* h,
                                      int64_t rows, int64_t num_slots, int64_t rank,
                                      int64_t depth) {
    int64_t result = -2;
    with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        result = lora_shrink(static_cast<const T*>(x), x_stride, static_cast<const T*>(a), slots,
                             h, rows, num_slots, rank, depth);
    });
    return result;
}

// lora_expand in fp32 (dtype 0) or bf16 (1): out and b in that dtype, h fp32 [rows, rank]
// (rows h_stride apart), slots int32 [rows]. Returns as kvpage_lora_shrink.
extern "C" int64_t kvpage_lora_expand(int32_t dtype, void* out, int64_t out_stride,
                                      const float* h, int64_t h_stride, const void* b,
                                      const int32_t* slots, int64_t rows, int64_t num_slots,
                                      int64_t n, int64_t rank) {
    int64_t result = -2;
    with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        result = lora_expand(static_cast<T*>(out), out_stride, h, h_stride,
                             static_cast<const T*>(b), slots, rows, num_slots, n, rank);
    });
    return result;
}

// ---- packed GEMM: out = x @ W^T + bias, the weights packed in column panels ---------------
//
// pack_weight (packed_weight.py) lays a weight W [n, k] out in panels of kPanelWidth output
// columns, the same layout on every tier: panel p holds W[p kPanelWidth + j][i] for the inputs
// i and columns j (columns past n are zero), in fp32 or bf16 ([k][kPanelWidth] values) or as
// low-bit codes (quantized.py: w = q s + m per group of inputs; [k / per_word][kPanelWidth]
// 32-bit words of per_word codes, the scales and offsets [groups][kPanelWidth] beside them).
// A call multiplies each panel by every row of x (up to kBlockRows at a time) before it moves
// on, so that each weight is read from memory once per call for a decode batch: OpenMP threads
// take contiguous runs of panels, and for each tile of up to kRows rows (a panel type's) the
// microkernel keeps the tile's kRows x kPanelWidth sums in registers over all k inputs while the
// panel (64 bytes per input in fp32, 8 in 4 bits) comes again from L2 for each tile; low-bit codes
// are dequantized in registers (QuantizedPanel), the weights of an input by one FMA per vector.
// Blocking k measured slower on AMD Zen 4, even for k = 14,336: the panel streams through the
// prefetchers either way, and each block costs a store and a reload of the sums. The
// microkernel broadcasts each row's inputs from x itself (a stream per row); only a weight with
// an input order of its own (GPTQ act-order) has x's rows gathered into that order first.
// (Copying every tile into k-major order instead, one stream at fixed offsets, cost 2 to 3% of
// a decode step on AMD Zen 3 in the copy alone, plus a barrier per call.)
//
// Each output is one chain of FMAs (a multiply, then an add, on the scalar tier) over the
// inputs in order, its bias added last: a row's result does not depend on the other rows of
// the batch, on the tiling or on the threads. For the low-bit weights of checkpoints (see
// QuantizedPanel) the dequantized weights equal the reference's, so the low-bit GEMM gives the
// bits of the fp32 one on them.

namespace {

constexpr int kPanelWidth = 16;  // output columns per panel: pack_weight's PANEL_WIDTH

// Rows per microkernel call, measured on AMD Zen 4: with AVX-512, 12 rows of one 16-lane vector
// (8 to 14 ran alike, 24 a third slower); with AVX2, 6 rows of two 8-lane vectors (12 sums,
// 2 weights and a broadcast in its 16 registers; 4 rows ran 30 to 45% slower), but 5 for low-bit
// weights, whose dequantization needs registers too (6 rows spilled them: 64 rows took 41% more
// time; 4 rows 9% more).
#if defined(KVPAGE_SIMD)
constexpr int kTileRows = Simd::width == 16 ? 12 : 6;
constexpr int kLowBitTileRows = Simd::width == 16 ? 12 : 5;
#else
constexpr int kTileRows = 4;
constexpr int kLowBitTileRows = 4;
#endif

template <int I>
using Index = std::integral_constant<int, I>;

// fn(Index<0>()), ..., fn(Index<N - 1>()): a loop unrolled at compile time, its index a constant.
template <typename Fn, int... I>
inline void unrolled(Fn&& fn, std::integer_sequence<int, I...>) {
    (fn(Index<I>()), ...);
}
template <int N, typename Fn>
inline void unrolled(Fn&& fn) {
    unrolled(fn, std::make_integer_sequence<int, N>());
}

// A panel as the microkernel reads it: its inputs come in groups that share their scales and
// offsets (a dense panel is one group). group(index) is the group of inputs index *
// group_size() on (the index counted, not divided out: a division per group cost 3 to 5% of
// a 16-row decode step's GEMMs on AMD Zen 3); a group loads kStep inputs at a time, a Block
// per vector c of the tile's columns, and gives the weights of each of them (`weights`), or
// one weight (`value`, scalar tier).
template <typename T>
struct DensePanel {  // fp32 or bf16 weights, bf16 widened in registers
    static constexpr int kStep = 1, kRows = kTileRows;
    const T* data;  // [depth][kPanelWidth]
    int64_t depth;

    int64_t group_size() const { return depth; }
    const DensePanel& group(int64_t) const { return *this; }
#if defined(KVPAGE_SIMD)
    using Block = Simd::V;
    Block load(int64_t i, int c) const {
        return Simd::load(data + i * kPanelWidth + c * Simd::width);
    }
    Simd::V weights(Block block, Index<0>, int) const { return block; }
#endif
    float value(int64_t i, int j) const { return to_float(data[i * kPanelWidth + j]); }
};

// Software prefetch of a low-bit panel, measured on AMD Zen 4 at one row (the hardware
// prefetchers alone left each call 9% slower; 16 lines ahead gained nothing): its words 8 lines
// (inputs for 8 words) ahead, its scales and offsets 2 groups ahead.
constexpr int kPrefetchLines = 8, kPrefetchGroups = 2;

// Codes of Bits bits, kStep = 32 / Bits to a word: a word's code s belongs to input
// word_index * kStep + s, at bit Bits * s. The vector paths widen a code q without converting an
// integer: shifted to the top of a float's mantissa under the exponent of 1.0 (one ternary
// logic op with AVX-512), it reads 1 + q / 2^Bits exactly, and w = (1 + q / 2^Bits) 2^Bits s +
// (m - 2^Bits s), one FMA whose two constants a group computes once: shift, merge and FMA per
// input and vector (instead of shift, mask, convert and FMA: 10% less time at one row, 1 to 4%
// at 16 and 64, measured on AMD Zen 4). Where q s and m - 2^Bits s are exact in fp32 (scales
// and offsets of checkpoints: fp16 values, or zero points times them) the FMA rounds the exact
// q s + m once, as the reference's q * s + m does.
// Bf16Weights: each weight rounded to bf16 once dequantized (the weights of bf16 inputs).
// G: the type the scales and offsets are stored in, float or Half (exact in fp16: fewer bytes
// to read per weight, widened as each group starts).
template <int Bits, bool Bf16Weights = false, typename G = float>
struct QuantizedPanel {
    static constexpr int kStep = 32 / Bits, kRows = kLowBitTileRows;
    static constexpr uint32_t kMask = (1u << Bits) - 1u;
    const uint32_t* words;  // [depth / kStep][kPanelWidth]
    const G* scales;        // [groups][kPanelWidth]
    const G* offsets;       // [groups][kPanelWidth]
    int64_t group_inputs;   // a multiple of kStep

    struct Group {
        const uint32_t* words;  // the panel's
        const G* scales;        // the group's [kPanelWidth]
        const G* offsets;

#if defined(KVPAGE_SIMD)
        static constexpr int C = kPanelWidth / Simd::width;
        static constexpr int kTop = 23 - Bits;  // a code's bit at the top of the mantissa
        Simd::V scaled[C], base[C];  // 2^Bits s, m - 2^Bits s

        Group() = default;
        Group(const uint32_t* w, const G* s, const G* m) : words(w), scales(s), offsets(m) {
            for (int c = 0; c < C; ++c) {
                scaled[c] = Simd::mul(Simd::load(s + c * Simd::width), Simd::set1(1 << Bits));
                base[c] = Simd::sub(Simd::load(m + c * Simd::width), scaled[c]);
            }
        }
        using Block = Simd::Words;
        Block load(int64_t i, int c) const {
            const uint32_t* at = words + i / kStep * kPanelWidth + c * Simd::width;
            if (c == 0) __builtin_prefetch(at + kPrefetchLines * kPanelWidth);
            return Simd::load_words(at);
        }
        template <int S>
        Simd::V weights(Block block, Index<S>, int c) const {
            constexpr int kLeft = kTop - Bits * S;  // code S's shift to the top of the mantissa
            const Simd::Words placed = kLeft >= 0 ? Simd::shift_left(block, kLeft)
                                                  : Simd::shift_right(block, -kLeft);
            const Simd::V one_plus_q = Simd::float_of_bits(placed, kMask << kTop, 0x3f800000u);
            const Simd::V w = Simd::fmadd(one_plus_q, scaled[c], base[c]);
            return Bf16Weights ? rounded_lanes<uint16_t>(w) : w;
        }
#else
        Group(const uint32_t* w, const G* s, const G* m) : words(w), scales(s), offsets(m) {}
#endif
        float value(int64_t i, int j) const {
            const uint32_t word = words[i / kStep * kPanelWidth + j];
            const uint32_t code = word >> (Bits * (i % kStep)) & kMask;
            const float scaled = static_cast<float>(code) * to_float(scales[j]);
            const float w = scaled + to_float(offsets[j]);
            return Bf16Weights ? rounded<uint16_t>(w) : w;
        }
    };

    int64_t group_size() const { return group_inputs; }
    Group group(int64_t index) const {
        const int64_t at = index * kPanelWidth;
        __builtin_prefetch(scales + at + kPrefetchGroups * kPanelWidth);
        __builtin_prefetch(offsets + at + kPrefetchGroups * kPanelWidth);
        return {words, scales + at, offsets + at};
    }
};

// The weights of a GEMM as the microkernel reads them: panel(p) is panel p, input_order the
// input of x that each of its inputs multiplies (null: the same one).
template <typename T>
struct DenseWeights {  // a PackedWeight
    static constexpr bool kLowBit = false;
    const T* panels;
    int64_t n, depth;
    const int64_t* input_order = nullptr;

    DensePanel<T> panel(int64_t p) const { return {panels + p * depth * kPanelWidth, depth}; }
};

// One panel of a GEMM's weights dequantized into an fp32 buffer, standing for every panel.
struct BufferedPanel {
    static constexpr bool kLowBit = false;
    const float* data;
    int64_t n, depth;

    DensePanel<float> panel(int64_t) const { return {data, depth}; }
};

template <int Bits, bool Bf16Weights = false, typename G = float>
struct QuantizedWeights {  // QuantizedPanels
    static constexpr bool kLowBit = true;
    static constexpr int kBits = Bits;
    const uint32_t* codes;
    const G* scales;
    const G* offsets;
    int64_t n, depth, group_size;
    const int64_t* input_order;

    QuantizedPanel<Bits, Bf16Weights, G> panel(int64_t p) const {
        const int64_t groups = depth / group_size;
        return {codes + p * (depth / QuantizedPanel<Bits>::kStep) * kPanelWidth,
                scales + p * groups * kPanelWidth, offsets + p * groups * kPanelWidth,
                group_size};
    }
};

// Low-bit weights whose microkernel also stores each weight it dequantizes into `kept`
// ([depth][kPanelWidth] fp32, as dequantize_panel lays a panel out; a tile then takes one
// panel at a time), so that the other tiles of rows read the panel from there.
template <typename Weights>
struct KeepingWeights : Weights {
    float* kept;
};

template <typename Weights>
constexpr bool kKeeps = false;  // true for KeepingWeights
template <typename Weights>
constexpr bool kKeeps<KeepingWeights<Weights>> = true;

// Panels a tile of m rows multiplies at once (never more for more rows): with AVX-512, a tile
// of one row runs the FMA chains of four panels side by side, which hides more of their
// latency (4 cycles on AMD Zen 4); measured there, 5 to 7% less time at one row for low-bit
// weights, while two panels for two or three rows took 13 to 25% more. AVX2's 16 registers
// cannot hold even two panels' codes, sums and group constants (a panel is two vectors there):
// four spilled 255 times per 128 FMAs, and one panel took 25 to 35% less time than four at one
// row for 4-bit weights on AMD Zen 3 (two: 15 to 25% less). Nor does staging help there: four
// panels' weights dequantized a chunk of 32 inputs at a time into an L1 buffer, then multiplied
// with eight chains, took 35 to 50% more time at one row; that kernel is bound by its vector
// operations (shift, mask, merge, FMA to dequantize 8 weights, an FMA to multiply them) about
// as much as by the chains' latency (without the dequantization it ran only 2% faster).
constexpr int panels_per_tile([[maybe_unused]] int m, [[maybe_unused]] bool keeps = false) {
#if defined(KVPAGE_SIMD)
    return m == 1 && Simd::width == 16 && !keeps ? 4 : 1;
#else
    return 1;  // the portable loops take one panel at a time
#endif
}

struct TileOut {  // where a tile's sums go
    float* out;          // its first row, column 0 of the output
    int64_t row_stride;  // n
    const float* bias;   // [n]; null: none
};

// Columns of panel p that exist, 0 past the last (the last may have fewer than kPanelWidth).
inline int panel_columns(int64_t n, int64_t p) {
    return static_cast<int>(std::clamp<int64_t>(n - p * kPanelWidth, 0, kPanelWidth));
}

#if defined(KVPAGE_SIMD)
// out[r][p kPanelWidth + j] = sum over i of x[r][i] * W(p, i, j) + bias, for the M rows of a
// tile, x's rows x_stride apart, and the `count` panels from `first` (NP panels side by side;
// with fewer, the last is read again and its sums dropped).
template <int M, int NP, typename Weights>
void panel_tile(const float* x, int64_t x_stride, const Weights& w, int64_t first, int count,
                const TileOut& o) {
    constexpr int C = kPanelWidth / Simd::width;
    using Panel = decltype(w.panel(0));
    using Group = std::decay_t<decltype(w.panel(0).group(0))>;
    Panel panels[NP];
    for (int q = 0; q < NP; ++q) panels[q] = w.panel(first + std::min(q, count - 1));
    Simd::V sums[M][NP][C];
    for (int r = 0; r < M; ++r)
        for (int q = 0; q < NP; ++q)
            for (int c = 0; c < C; ++c) sums[r][q][c] = Simd::zero();
    const int64_t group_size = panels[0].group_size();
    for (int64_t begin = 0, index = 0; begin < w.depth; begin += group_size, ++index) {
        Group groups[NP];
        for (int q = 0; q < NP; ++q) groups[q] = panels[q].group(index);
        for (int64_t i = begin; i < begin + group_size; i += Panel::kStep) {
            typename Group::Block blocks[NP][C];
            for (int q = 0; q < NP; ++q)
                for (int c = 0; c < C; ++c) blocks[q][c] = groups[q].load(i, c);
            unrolled<Panel::kStep>([&](auto s) {
                Simd::V weights[NP][C];
                for (int q = 0; q < NP; ++q)
                    for (int c = 0; c < C; ++c)
                        weights[q][c] = groups[q].weights(blocks[q][c], s, c);
                if constexpr (kKeeps<Weights>) {
                    static_assert(NP == 1);
                    for (int c = 0; c < C; ++c)
                        Simd::store(w.kept + (i + s) * kPanelWidth + c * Simd::width,
                                    weights[0][c]);
                }
                for (int r = 0; r < M; ++r) {
                    const Simd::V xr = Simd::set1(x[r * x_stride + i + s]);
                    for (int q = 0; q < NP; ++q)
                        for (int c = 0; c < C; ++c)
                            sums[r][q][c] = Simd::fmadd(xr, weights[q][c], sums[r][q][c]);
                }
            });
        }
    }
    for (int q = 0; q < count; ++q) {
        const int64_t col = (first + q) * kPanelWidth;
        const int panel_cols = panel_columns(w.n, first + q);
        for (int c = 0; c < C && c * Simd::width < panel_cols; ++c) {
            const int cols = panel_cols - c * Simd::width;
            const Simd::Lanes lanes = Simd::first(cols);
            const float* bias = o.bias != nullptr ? o.bias + col + c * Simd::width : nullptr;
            const Simd::V b = bias != nullptr ? Simd::load(bias, lanes, 0.f) : Simd::zero();
            for (int r = 0; r < M; ++r) {
                const Simd::V sum = sums[r][q][c];
                const Simd::V result = bias != nullptr ? Simd::add(sum, b) : sum;
                float* dst = o.out + r * o.row_stride + col + c * Simd::width;
                if (cols >= Simd::width) {
                    Simd::store(dst, result);
                } else {
                    Simd::store(dst, lanes, result);
                }
            }
        }
    }
}
#else
template <int M, int NP, typename Weights>
void panel_tile(const float* x, int64_t x_stride, const Weights& w, int64_t first, int count,
                const TileOut& o) {
    for (int q = 0; q < count; ++q) {
        const auto panel = w.panel(first + q);
        float sums[M][kPanelWidth] = {};
        for (int64_t begin = 0, index = 0; begin < w.depth; begin += panel.group_size(), ++index) {
            const auto& group = panel.group(index);
            for (int64_t i = begin; i < begin + panel.group_size(); ++i) {
                if constexpr (kKeeps<Weights>)
                    for (int j = 0; j < kPanelWidth; ++j)
                        w.kept[i * kPanelWidth + j] = group.value(i, j);
                for (int r = 0; r < M; ++r) {
                    const float xr = x[r * x_stride + i];
#pragma omp simd
                    for (int j = 0; j < kPanelWidth; ++j) sums[r][j] += xr * group.value(i, j);
                }
            }
        }
        const int64_t col = (first + q) * kPanelWidth;
        for (int r = 0; r < M; ++r)
            for (int j = 0; j < panel_columns(w.n, first + q); ++j) {
                const float sum = sums[r][j];
                o.out[r * o.row_stride + col + j] = o.bias != nullptr ? sum + o.bias[col + j] : sum;
            }
    }
}
#endif

// panel_tile for M = 1 .. N rows, indexed by M - 1.
template <typename Weights, int... M>
constexpr auto tile_kernels(std::integer_sequence<int, M...>) {
    using Kernel =
        void (*)(const float*, int64_t, const Weights&, int64_t, int, const TileOut&);
    return std::array<Kernel, sizeof...(M)>{
        &panel_tile<M + 1, panels_per_tile(M + 1, kKeeps<Weights>), Weights>...};
}

// The rows of a batch cut into as few tiles of at most tile_rows as possible, of sizes that
// differ by one at most (16 rows in tiles of 12: two tiles of 8, not 12 and 4).
struct RowTiles {
    int64_t count, base, longer;  // the first `longer` tiles have base + 1 rows, the rest base

    RowTiles(int64_t rows, int tile_rows)
        : count((rows + tile_rows - 1) / tile_rows),
          base(count > 0 ? rows / count : 0),
          longer(count > 0 ? rows % count : 0) {}
    int64_t first_row(int64_t t) const { return t * base + std::min(t, longer); }
    int rows(int64_t t) const { return static_cast<int>(base + (t < longer ? 1 : 0)); }
};

// The m rows at x (row_stride apart) into dst as [m][depth], input i of a row read from
// x[order[i]].
void gather_inputs(const float* x, int64_t row_stride, int m, int64_t depth,
                   const int64_t* order, float* dst) {
    for (int r = 0; r < m; ++r)
        for (int64_t i = 0; i < depth; ++i) dst[r * depth + i] = x[r * row_stride + order[i]];
}

// A buffer of at least n floats for the calling thread, kept for its next call.
float* tile_buffer(size_t n) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < n) buffer.resize(n);
    return buffer.data();
}

// Rows multiplied per pass over the weights: a batch of up to 256 rows (a decode step's) reads
// each weight once, and a longer one (a prefill chunk) once per 256 rows, a small cost next to
// the 512 FLOPs per weight in between, which keeps the block of x that every panel reads near
// the core (measured 18% faster for 2,048 rows with k = 1,536 on AMD Zen 4).
constexpr int64_t kBlockRows = 256;

// Runs of panels per thread in a GEMM call (below).
constexpr int64_t kRunsPerThread = 8;

// The shape of every packed GEMM call: prepare(t) for each of the `tiles` tiles of rows (x
// gathered or quantized into the tile's layout; none: nothing to prepare) on OpenMP threads,
// then, once every tile is ready, multiply(begin, end) for runs of the num_panels panels, a
// multiple of `step` panels each but the last, about kRunsPerThread runs per thread, which
// the threads take in turn as each finishes its last: a thread that the rest of the machine
// slows down takes fewer, instead of keeping the others waiting at the end of the call (on a
// shared 2-core AMD Zen 3, the second thread of 16-row decode steps on the default model
// waited 18% of its time with equal shares, 13.5% with runs). Every output column comes from
// one run whichever thread takes it, so the results do not depend on the schedule. One thread
// where the call has fewer than 2^18 multiply-adds (`work`).
template <typename Prepare, typename Multiply>
void tiles_then_panels(int64_t work, int64_t tiles, int64_t num_panels, int64_t step,
                       Prepare prepare, Multiply multiply) {
    const int64_t runs = kRunsPerThread * omp_get_max_threads();
    const int64_t run = (std::max<int64_t>(1, num_panels / runs) + step - 1) / step * step;
#pragma omp parallel if (work > (1 << 18))
    {
        if (tiles > 0) {  // the same on every thread: all or none meet the loop
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; ++t) prepare(t);
            // the loop's closing barrier: every tile is ready before any is multiplied
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t begin = 0; begin < num_panels; begin += run)
            multiply(begin, std::min(begin + run, num_panels));
    }
}

// The weights of a low-bit panel in fp32, as its microkernel reads them: [depth][kPanelWidth].
template <typename Panel>
void dequantize_panel(const Panel& panel, int64_t depth, float* dst) {
    const int64_t group_size = panel.group_size();
    for (int64_t begin = 0, index = 0; begin < depth; begin += group_size, ++index) {
        const auto group = panel.group(index);
#if defined(KVPAGE_SIMD)
        for (int64_t i = begin; i < begin + group_size; i += Panel::kStep)
            for (int c = 0; c < kPanelWidth / Simd::width; ++c) {
                const auto block = group.load(i, c);
                unrolled<Panel::kStep>([&](auto s) {
                    Simd::store(dst + (i + s) * kPanelWidth + c * Simd::width,
                                group.weights(block, s, c));
                });
            }
#else
        for (int64_t i = begin; i < begin + group_size; ++i)
            for (int j = 0; j < kPanelWidth; ++j) dst[i * kPanelWidth + j] = group.value(i, j);
#endif
    }
}

// A buffer of at least n floats for the calling thread, apart from tile_buffer's.
float* panel_buffer(size_t n) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < n) buffer.resize(n);
    return buffer.data();
}

// Low-bit panels are dequantized in registers as a tile of rows multiplies them, again for
// every tile; with this many tiles or more, each panel is dequantized once into an fp32 buffer
// that fp32 tiles of kTileRows rows, their fastest, then read (the same weights, so the same
// sums). The rows left over (rows % kTileRows) form a low-bit tile that stores the weights it
// dequantizes as it multiplies them (KeepingWeights); with none left over, a pass of its own
// dequantizes the panel. Measured on AMD Zen 3 (a 16-row decode step's GEMMs, 4- and 8-bit
// weights): a pass of its own took 23% of the time, 13 rows as 1 + 6 + 6 took 21% less time
// than a pass and tiles of 5, 4 and 4 rows, and 16 as 4 + 6 + 6 4 to 9% less than a pass and
// 6, 5 and 5. Dequantizing the next panel into a second buffer in the gaps of this panel's
// microkernel (a few words of codes every so many inputs) measured no faster there: 16 rows,
// one thread, 4-bit weights read from memory, 52.7 to 72.5 GFLOP/s against 72.9, likely
// because two buffers crowd L1 more than one.
constexpr int64_t kDequantizeOnceTiles = 2;

// out [rows, w.n] = x [rows, w.depth] @ W^T (+ bias [w.n]), rows at most kBlockRows.
template <typename Weights>
void multiply_block(const float* x, int64_t x_stride, int64_t rows, const Weights& w,
                    const float* bias, float* out) {
    constexpr int kRows = decltype(w.panel(0))::kRows;
    static constexpr auto kernels = tile_kernels<Weights>(std::make_integer_sequence<int, kRows>());
    static constexpr auto keeping_kernels =
        tile_kernels<KeepingWeights<Weights>>(std::make_integer_sequence<int, kRows>());
    static constexpr auto buffered_kernels =
        tile_kernels<BufferedPanel>(std::make_integer_sequence<int, kTileRows>());
    static_assert(kRows <= kTileRows && kTileRows - 1 <= kRows);
    const int64_t n = w.n, depth = w.depth;
    const bool dequantize_once =
        Weights::kLowBit && RowTiles(rows, kRows).count >= kDequantizeOnceTiles;
    // With dequantize_once, rows 0 .. kept_rows - 1 (none, or fewer than kTileRows) form the
    // tile that keeps the weights, and `tiles` the fp32 tiles of kTileRows rows after it.
    const int kept_rows = dequantize_once ? static_cast<int>(rows % kTileRows) : 0;
    const RowTiles tiles(rows - kept_rows, dequantize_once ? kTileRows : kRows);
    const bool gather = w.input_order != nullptr;  // x's rows into the weight's input order
    const RowTiles gather_tiles(rows, kTileRows);
    float* gathered = gather ? tile_buffer(static_cast<size_t>(rows * depth)) : nullptr;
    const float* inputs = gather ? gathered : x;
    const int64_t stride = gather ? depth : x_stride;
    const int64_t num_panels = (n + kPanelWidth - 1) / kPanelWidth;
    const int step = panels_per_tile(tiles.rows(0));  // the first tile is the tallest
    const auto gather_tile = [&](int64_t t) {
        const int64_t row = gather_tiles.first_row(t);
        gather_inputs(x + row * x_stride, x_stride, gather_tiles.rows(t), depth, w.input_order,
                      gathered + row * depth);
    };
    const auto multiply = [&](int64_t begin, int64_t end) {
        if (dequantize_once) {  // one panel at a time
            float* panel = panel_buffer(static_cast<size_t>(depth * kPanelWidth));
            const KeepingWeights<Weights> keeping{{w}, panel};
            const BufferedPanel buffered{panel, n, depth};
            for (int64_t p = begin; p < end; ++p) {
                if (kept_rows > 0) {
                    keeping_kernels[kept_rows - 1](inputs, stride, keeping, p, 1,
                                                   TileOut{out, n, bias});
                } else {
                    dequantize_panel(w.panel(p), depth, panel);
                }
                for (int64_t t = 0; t < tiles.count; ++t) {
                    const int64_t row = kept_rows + tiles.first_row(t);
                    buffered_kernels[tiles.rows(t) - 1](inputs + row * stride, stride, buffered,
                                                        p, 1, TileOut{out + row * n, n, bias});
                }
            }
        } else {
            for (int64_t p = begin; p < end; p += step) {
                const int count = static_cast<int>(std::min<int64_t>(step, end - p));
                for (int64_t t = 0; t < tiles.count; ++t) {
                    const int64_t row = tiles.first_row(t);
                    kernels[tiles.rows(t) - 1](inputs + row * stride, stride, w, p, count,
                                               TileOut{out + row * n, n, bias});
                }
            }
        }
    };
    tiles_then_panels(rows * depth * n, gather ? gather_tiles.count : 0, num_panels,
                      dequantize_once ? 1 : step, gather_tile, multiply);
}

// out [rows, w.n] = x [rows, w.depth] @ W^T (+ bias [w.n]).
template <typename Weights>
void packed_linear(const float* x, int64_t x_stride, int64_t rows, const Weights& w,
                   const float* bias, float* out) {
    for (int64_t first = 0; first < rows; first += kBlockRows)
        multiply_block(x + first * x_stride, x_stride, std::min(kBlockRows, rows - first), w, bias,
                       out + first * w.n);
}

}  // namespace

// A low-bit weight packed by pack_weight (QuantizedPanels), as the C side reads it.
struct QuantizedMatrix {
    const uint32_t* codes;     // [panels][in_features / (32 / bits)][kPanelWidth]
    const void* scales;        // [panels][in_features / group_size][kPanelWidth]
    const void* offsets;       // likewise
    const int64_t* input_order;  // [in_features]; null: the natural order
    int64_t out_features, in_features, group_size;
    int32_t bits;              // 4 or 8
    int32_t int8_activations;  // 1 (4 bits only): x rounded to int8 as it is multiplied (below)
    int32_t half_groups;       // 1: scales and offsets in fp16, 0: in fp32

    // fn(weights) for the QuantizedWeights<Bits, Bf16Weights, G> these are (G: float or
    // Half); 1 for bits other than 4 and 8.
    template <bool Bf16Weights, typename Fn>
    int visit(Fn fn) const {
        const auto with = [&](auto bits, auto* group_type) {  // a null G*
            using G = std::remove_pointer_t<decltype(group_type)>;
            return fn(QuantizedWeights<decltype(bits)::value, Bf16Weights, G>{
                codes, static_cast<const G*>(scales), static_cast<const G*>(offsets),
                out_features, in_features, group_size, input_order});
        };
        const auto with_bits = [&](auto bits) {
            return half_groups ? with(bits, static_cast<Half*>(nullptr))
                               : with(bits, static_cast<float*>(nullptr));
        };
        if (bits == 4) return with_bits(Index<4>());
        if (bits == 8) return with_bits(Index<8>());
        return 1;
    }
};

namespace {

// ---- 4-bit GEMM on int8 activations (QuantizedMatrix::int8_activations) -------------------
//
// The opt-in mode that multiplies as llama.cpp does. Each row of x is quantized in blocks of
// kActBlock consecutive inputs (in the weight's input order) within each group, the last block
// of a group shorter where the group is not a multiple of kActBlock: d = max|x| / 127 and
// xq = round(x * (127 / max|x|)) to the nearest integer, ties to even (zeros for a block of
// zeros; a NaN makes d a NaN). The codes times xq are summed exactly in integers, dot_b per
// block, and each output is
//   acc = fma(dot_b, d_b * s_g, acc) over the blocks b of each group g in order, then
//   acc = fma(m_g, xsum_g, acc), xsum_g = fma(d_b, sum of xq_b, xsum_g) over g's blocks,
// plus the bias: the dequantized weights times the activations xq d, rounded at the same fp32
// steps on every tier, so every tier gives the same bits and a row's result does not depend
// on the other rows. It differs from the fp32 GEMM by the activations' rounding (at most half
// a step, max|x| / 254, in each block).
//
// With AVX2, VPMADDUBSW multiplies 32 unsigned codes by 32 signed activations and sums pairs
// into 16-bit lanes. A 32-bit word of codes holds one column's 8 nibbles, the even inputs' in
// its bytes' low nibbles and the odd inputs' in the high ones, so a vector of 8 words, masked
// (or shifted by 4 and masked), multiplies the 4 activations that one broadcast 32-bit value
// holds, for 8 columns; no pair of products exceeds 2 * 15 * 127, so the 16-bit sums of a
// block (8 pairs a lane) cannot saturate. They are widened to 32 bits once per block
// (VPMADDWD), converted and scaled in fp32. Measured on AMD Zen 3 (bench/gemm.py) against the
// GEMM with fp32 activations, which dequantizes every weight: 0.85 of its time at one row,
// 0.72 at 16 rows, 0.81 at 64. 8-bit codes would need their two nibbles multiplied apart,
// which measured slower than the fp32 GEMM there, so they keep fp32 activations.

constexpr int64_t kActBlock = 32;

// Rows per int8 microkernel call (a half panel, 8 columns): measured on AMD Zen 3, 8 rows ran
// as fast as 6 and faster than 4.
constexpr int kInt8TileRows = 8;

// The input whose activation sits in byte `lane` of quad `quad` (the 4 activations that one
// mask of a word of codes multiplies: the word's even inputs, then its odd ones).
constexpr int64_t quad_input(int64_t quad, int lane) { return quad / 2 * 8 + lane * 2 + quad % 2; }

// A tile of m rows of x quantized: quads [depth / 4][m] (4 int8 activations of a row, as
// quad_input orders them), d [blocks][m], and the groups' xsum [groups][m].
struct Int8Tile {
    const int32_t* quads;
    const float* d;
    const float* xsum;
};

inline int64_t blocks_per_group(int64_t group_size) {
    return (group_size + kActBlock - 1) / kActBlock;
}

struct QuantizedBlock {
    float d;      // max|x| / 127
    int32_t sum;  // of the block's int8 values
};

// 127 / max|x|, or 0 where that is not a finite number.
inline float inverse_step(float amax) { return amax > 0.f && amax <= FLT_MAX ? 127.f / amax : 0.f; }

#if defined(__AVX2__) && defined(__FMA__)
// quantize_block (below) for inputs in their natural order, a word's 8 inputs at a time (the
// same values: the conversion rounds to nearest even, as nearbyint does).
QuantizedBlock quantize_block_lanes(const float* row, int64_t first, int64_t last, int m, int r,
                                    int8_t* quads) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax_lanes = _mm256_setzero_ps(), nans = _mm256_setzero_ps();
    for (int64_t i = first; i < last; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        amax_lanes = _mm256_max_ps(amax_lanes, _mm256_and_ps(v, magnitude));
        nans = _mm256_or_ps(nans, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax_lanes);
    const float amax = _mm256_movemask_ps(nans) ? NAN : *std::max_element(lanes, lanes + 8);
    const __m256 inverse = _mm256_set1_ps(inverse_step(amax));
    const __m256i even_then_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                               -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1,
                                               -1, -1, -1, -1, -1, -1);
    __m256i sums = _mm256_setzero_si256();
    for (int64_t i = first; i < last; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + i), inverse);
        const __m256i q = _mm256_and_si256(_mm256_cvtps_epi32(v),
                                           _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
        sums = _mm256_add_epi32(sums, q);
        const __m256i bytes =
            _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(q, even_then_odd), low_bytes);
        const int32_t even = _mm256_cvtsi256_si32(bytes), odd = _mm256_extract_epi32(bytes, 4);
        std::memcpy(quads + (i / 4 * m + r) * 4, &even, 4);  // the word's quads i / 4, i / 4 + 1
        std::memcpy(quads + ((i / 4 + 1) * m + r) * 4, &odd, 4);
    }
    alignas(32) int32_t parts[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(parts), sums);
    int32_t sum = 0;
    for (const int32_t part : parts) sum += part;
    return {amax / 127.f, sum};
}
#endif

// Inputs [first, last) of `row` (input i at row[order[i]], or row[i]) rounded to int8 into
// the quads of row r of an m-row tile.
QuantizedBlock quantize_block(const float* row, int64_t first, int64_t last,
                              const int64_t* order, int m, int r, int8_t* quads) {
#if defined(__AVX2__) && defined(__FMA__)
    if (order == nullptr) return quantize_block_lanes(row, first, last, m, r, quads);
#endif
    const auto input = [&](int64_t i) { return row[order != nullptr ? order[i] : i]; };
    float amax = 0.f;
    for (int64_t i = first; i < last; ++i) {
        const float v = std::fabs(input(i));
        amax = v > amax || v != v ? v : amax;  // a NaN stays
    }
    const float inverse = inverse_step(amax);
    int32_t sum = 0;
    for (int64_t quad = first / 4; quad < last / 4; ++quad)
        for (int lane = 0; lane < 4; ++lane) {
            const float v = input(quad_input(quad, lane)) * inverse;
            const int32_t q = v == v ? static_cast<int32_t>(std::nearbyint(v)) : 0;
            quads[(quad * m + r) * 4 + lane] = static_cast<int8_t>(q);
            sum += q;
        }
    return {amax / 127.f, sum};
}

// The m rows at x (row_stride apart) quantized into an Int8Tile's arrays.
void quantize_tile(const float* x, int64_t row_stride, int m, int64_t depth, int64_t group_size,
                   const int64_t* order, int8_t* quads, float* d, float* xsum) {
    int64_t block = 0;
    for (int64_t begin = 0; begin < depth; begin += group_size) {
        const int64_t group = begin / group_size;
        for (int r = 0; r < m; ++r) xsum[group * m + r] = 0.f;
        for (int64_t first = begin; first < begin + group_size; first += kActBlock, ++block) {
            const int64_t last = std::min(first + kActBlock, begin + group_size);
            for (int r = 0; r < m; ++r) {
                const float* row = x + r * row_stride;
                const QuantizedBlock q = quantize_block(row, first, last, order, m, r, quads);
                d[block * m + r] = q.d;
                xsum[group * m + r] =
                    std::fma(q.d, static_cast<float>(q.sum), xsum[group * m + r]);
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
// 8 of a group's scales or offsets in fp32 (the int8 kernels work on 8 columns at a time in
// the avx512 tier too, where Simd::load reads 16).
inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }
inline __m256 load8(const Half* src) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

// The 16-bit sums of the M rows' products over `words` words of codes from `word` (a block),
// for the 8 columns whose words start at `codes`.
template <int M>
inline void int8_block_sums(const Int8Tile& x, const uint32_t* codes, int64_t word,
                            int64_t words, __m256i (&sums)[M]) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < M; ++r) sums[r] = _mm256_setzero_si256();
    for (int64_t end = word + words; word < end; ++word) {
        const __m256i packed =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + word * kPanelWidth));
        const __m256i even = _mm256_and_si256(packed, nibble);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
        for (int r = 0; r < M; ++r) {
            const __m256i x_even = _mm256_set1_epi32(x.quads[2 * word * M + r]);
            const __m256i x_odd = _mm256_set1_epi32(x.quads[(2 * word + 1) * M + r]);
            sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(even, x_even));
            sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(odd, x_odd));
        }
    }
}

// out[r][col + j] = the int8 GEMM's sum for the M rows of the tile and the `cols` (1 .. 8)
// columns of half `half` of the panel, + bias.
template <int M, typename G>
void int8_half_tile(const Int8Tile& x, const QuantizedPanel<4, false, G>& panel, int half,
                    int64_t depth, const TileOut& o, int64_t col, int cols) {
    constexpr int64_t kBlockWords = kActBlock / 8;
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t group_size = panel.group_size();
    const uint32_t* codes = panel.words + half * 8;
    const float* d = x.d;
    const float* xsum = x.xsum;
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t begin = 0, group = 0; begin < depth; begin += group_size, ++group, xsum += M) {
        const __m256 s = load8(panel.scales + group * kPanelWidth + half * 8);
        for (int64_t first = begin; first < begin + group_size; first += kActBlock, d += M) {
            const int64_t words = std::min(kActBlock, begin + group_size - first) / 8;
            __m256i sums[M];
            if (words == kBlockWords)  // a whole block: a loop of constant length
                int8_block_sums<M>(x, codes, first / 8, kBlockWords, sums);
            else
                int8_block_sums<M>(x, codes, first / 8, words, sums);
            for (int r = 0; r < M; ++r) {
                const __m256i dot = _mm256_madd_epi16(sums[r], ones);
                const __m256 ds = _mm256_mul_ps(_mm256_broadcast_ss(d + r), s);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), ds, acc[r]);
            }
        }
        const __m256 m = load8(panel.offsets + group * kPanelWidth + half * 8);
        for (int r = 0; r < M; ++r)
            acc[r] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(xsum + r), acc[r]);
    }
    const __m256i lanes =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 b = o.bias != nullptr ? _mm256_maskload_ps(o.bias + col, lanes)
                                       : _mm256_setzero_ps();
    for (int r = 0; r < M; ++r)
        _mm256_maskstore_ps(o.out + r * o.row_stride + col, lanes, _mm256_add_ps(acc[r], b));
}
#else
template <int M, typename G>
void int8_half_tile(const Int8Tile& x, const QuantizedPanel<4, false, G>& panel, int half,
                    int64_t depth, const TileOut& o, int64_t col, int cols) {
    const auto* quads = reinterpret_cast<const int8_t*>(x.quads);
    const int64_t group_size = panel.group_size();
    for (int j = 0; j < cols; ++j) {
        const int64_t column = half * 8 + j;
        for (int r = 0; r < M; ++r) {
            float acc = 0.f;
            int64_t block = 0;
            for (int64_t begin = 0; begin < depth; begin += group_size) {
                const int64_t group = begin / group_size;
                const float s = to_float(panel.scales[group * kPanelWidth + column]);
                for (int64_t first = begin; first < begin + group_size;
                     first += kActBlock, ++block) {
                    const int64_t last = std::min(first + kActBlock, begin + group_size);
                    int32_t dot = 0;
                    for (int64_t quad = first / 4; quad < last / 4; ++quad)
                        for (int lane = 0; lane < 4; ++lane) {
                            const int64_t i = quad_input(quad, lane);
                            const uint32_t word = panel.words[i / 8 * kPanelWidth + column];
                            const int32_t code = word >> (4 * (i % 8)) & 0xFu;
                            dot += code * quads[(quad * M + r) * 4 + lane];
                        }
                    acc = std::fma(static_cast<float>(dot), x.d[block * M + r] * s, acc);
                }
                acc = std::fma(to_float(panel.offsets[group * kPanelWidth + column]),
                               x.xsum[group * M + r], acc);
            }
            const float bias = o.bias != nullptr ? o.bias[col + j] : 0.f;
            o.out[r * o.row_stride + col + j] = acc + bias;
        }
    }
}
#endif

// int8_half_tile for M = 1 .. N rows, indexed by M - 1.
template <typename G, int... M>
constexpr auto int8_tile_kernels(std::integer_sequence<int, M...>) {
    using Kernel = void (*)(const Int8Tile&, const QuantizedPanel<4, false, G>&, int, int64_t,
                            const TileOut&, int64_t, int);
    return std::array<Kernel, sizeof...(M)>{&int8_half_tile<M + 1, G>...};
}

// out [rows, w.n] = the int8 GEMM of x [rows, w.depth] and W (+ bias), rows at most kBlockRows:
// the rows are quantized tile by tile, then each thread's panels are multiplied half by half
// (8 columns) by every tile.
template <typename G>
void multiply_block_int8(const float* x, int64_t x_stride, int64_t rows,
                         const QuantizedWeights<4, false, G>& w, const float* bias, float* out) {
    static constexpr auto kernels =
        int8_tile_kernels<G>(std::make_integer_sequence<int, kInt8TileRows>());
    const int64_t n = w.n, depth = w.depth, quads = depth / 4;
    const int64_t groups = depth / w.group_size, blocks = groups * blocks_per_group(w.group_size);
    const RowTiles tiles(rows, kInt8TileRows);
    thread_local std::vector<int32_t> quad_buffer;
    thread_local std::vector<float> scale_buffer;
    quad_buffer.resize(static_cast<size_t>(rows * quads));
    scale_buffer.resize(static_cast<size_t>(rows * (blocks + groups)));
    int32_t* xq = quad_buffer.data();
    float* d = scale_buffer.data();
    float* xsum = d + rows * blocks;
    const int64_t num_panels = (n + kPanelWidth - 1) / kPanelWidth;
    const auto quantize = [&](int64_t t) {
        const int64_t row = tiles.first_row(t);
        quantize_tile(x + row * x_stride, x_stride, tiles.rows(t), depth, w.group_size,
                      w.input_order, reinterpret_cast<int8_t*>(xq + row * quads),
                      d + row * blocks, xsum + row * groups);
    };
    const auto multiply = [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const auto panel = w.panel(p);
            const int panel_cols = panel_columns(n, p);
            for (int half = 0; half * 8 < panel_cols; ++half)
                for (int64_t t = 0; t < tiles.count; ++t) {
                    const int64_t row = tiles.first_row(t);
                    const Int8Tile tile{xq + row * quads, d + row * blocks, xsum + row * groups};
                    kernels[tiles.rows(t) - 1](tile, panel, half, depth,
                                               TileOut{out + row * n, n, bias},
                                               p * kPanelWidth + half * 8,
                                               std::min(8, panel_cols - half * 8));
                }
        }
    };
    tiles_then_panels(rows * depth * n, tiles.count, num_panels, 1, quantize, multiply);
}

// out [rows, w.out_features] = x [rows, w.in_features] @ W^T (+ bias) for the low-bit W; 0, or
// 1 for bits other than 4 and 8.
int quantized_linear(const QuantizedMatrix& w, const float* x, int64_t x_stride, int64_t rows,
                     const float* bias, float* out) {
    return w.visit<false>([&](const auto& weights) {
        using Weights = std::decay_t<decltype(weights)>;
        if constexpr (Weights::kBits == 4) {
            if (w.int8_activations) {
                for (int64_t first = 0; first < rows; first += kBlockRows)
                    multiply_block_int8(x + first * x_stride, x_stride,
                                        std::min(kBlockRows, rows - first), weights, bias,
                                        out + first * w.out_features);
                return 0;
            }
        }
        packed_linear<Weights>(x, x_stride, rows, weights, bias, out);
        return 0;
    });
}

// Rows `ids` [n] of the low-bit W in fp32 [n, in_features], the inputs in their natural order,
// as QuantizedWeight.dequantize computes them (code * scale, then + offset: two roundings):
// the lookup of a quantized embedding table (a prefill's rows on OpenMP threads). -1, or the
// index in ids of the first id outside [0, out_features) (then nothing is written).
int64_t quantized_rows(const QuantizedMatrix& w, const int64_t* ids, int64_t n, float* out) {
    for (int64_t r = 0; r < n; ++r)
        if (ids[r] < 0 || ids[r] >= w.out_features) return r;
    w.visit<false>([&](const auto& weights) {
#pragma omp parallel for schedule(static) if (n * weights.depth > (1 << 16))
        for (int64_t r = 0; r < n; ++r) {
            const auto panel = weights.panel(ids[r] / kPanelWidth);
            const int column = static_cast<int>(ids[r] % kPanelWidth);
            const int64_t* order = weights.input_order;
            float* row = out + r * weights.depth;
            for (int64_t begin = 0, index = 0; begin < weights.depth;
                 begin += weights.group_size, ++index) {
                const auto group = panel.group(index);
                for (int64_t i = begin; i < begin + weights.group_size; ++i)
                    row[order != nullptr ? order[i] : i] = group.value(i, column);
            }
        }
        return 0;
    });
    return -1;
}

#if defined(__AVX512F__)
// ---- low-bit GEMM on bf16 activations, with AVX512-BF16 dot products -----------------------
//
// With bf16 inputs, packed_linear's contract rounds the dequantized weights to bf16 and sums
// the products in fp32: what VDPBF16PS computes, two products per fp32 lane and instruction
// (twice the FMAs' rate). Each panel is dequantized once per call (the reference's w = q s + m,
// rounded to bf16) into pairs of consecutive inputs, a 32-bit lane per output column; a tile's
// rows are copied as pairs of inputs (in the weight's input order), each pair broadcast to
// every lane. Built into the avx512 tier's library with the instructions enabled for these
// functions alone, and called only where the CPU has them (kvpage_bf16_dot).

constexpr int kBf16TileRows = 12;

// The panel's weights rounded to bf16 (to nearest even, as to_bf16, by the conversion):
// dst[i / 2][j] holds inputs i and i + 1 of column j.
template <int Bits, typename G>
__attribute__((target("avx512bf16"))) void dequantize_panel_pairs(
    const QuantizedPanel<Bits, true, G>& rounded, int64_t depth, float* scratch, uint32_t* dst) {
    const QuantizedPanel<Bits, false, G> panel{rounded.words, rounded.scales, rounded.offsets,
                                               rounded.group_inputs};
    dequantize_panel(panel, depth, scratch);
    // lanes 0-15 of a conversion hold input i's columns, 16-31 input i + 1's: interleaved
    alignas(64) static constexpr uint16_t kInterleave[32] = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_load_si512(kInterleave);
    for (int64_t i = 0; i < depth; i += 2) {
        const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(scratch + (i + 1) * kPanelWidth),
                                                  _mm512_loadu_ps(scratch + i * kPanelWidth));
        _mm512_storeu_si512(dst + i / 2 * kPanelWidth,
                            _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
}

// Panels a bf16 tile multiplies at once: each broadcast pair of a row serves both (24 sums,
// 2 weights and a broadcast in the 32 registers).
constexpr int kBf16Panels = 2;

// M rows of pairs x [pairs][M] times NP panels of pairs w[q] [pairs][kPanelWidth] into out,
// from column col (the panels' columns that exist: cols[q]).
template <int M, int NP>
__attribute__((target("avx512bf16"))) void bf16_panel_tile(const uint32_t* x,
                                                           const uint32_t* const* w,
                                                           int64_t pairs, const TileOut& o,
                                                           int64_t col, const int* cols) {
    __m512 sums[M][NP];
    for (int r = 0; r < M; ++r)
        for (int q = 0; q < NP; ++q) sums[r][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; ++i) {
        __m512bh wv[NP];
        for (int q = 0; q < NP; ++q) wv[q] = (__m512bh)_mm512_loadu_si512(w[q] + i * kPanelWidth);
        for (int r = 0; r < M; ++r) {
            const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * M + r]));
            for (int q = 0; q < NP; ++q) sums[r][q] = _mm512_dpbf16_ps(sums[r][q], wv[q], xr);
        }
    }
    for (int q = 0; q < NP; ++q) {
        const int64_t at = col + q * kPanelWidth;
        const __mmask16 lanes = static_cast<__mmask16>((1u << cols[q]) - 1u);
        const __m512 b = o.bias != nullptr ? _mm512_maskz_loadu_ps(lanes, o.bias + at)
                                           : _mm512_setzero_ps();
        for (int r = 0; r < M; ++r)
            _mm512_mask_storeu_ps(o.out + r * o.row_stride + at, lanes,
                                  _mm512_add_ps(sums[r][q], b));
    }
}

// bf16_panel_tile for M = 1 .. N rows (indexed by M - 1), of NP panels.
template <int NP, int... M>
constexpr auto bf16_tile_kernels(std::integer_sequence<int, M...>) {
    using Kernel = void (*)(const uint32_t*, const uint32_t* const*, int64_t, const TileOut&,
                            int64_t, const int*);
    return std::array<Kernel, sizeof...(M)>{&bf16_panel_tile<M + 1, NP>...};
}

// The m bf16 rows at x (row_stride apart) into dst as [depth / 2][m] pairs, input i of a row
// read from x[order[i]] (x[i] where order is null).
void copy_pairs(const uint16_t* x, int64_t row_stride, int m, int64_t depth,
                const int64_t* order, uint32_t* dst) {
    for (int64_t i = 0; i < depth; i += 2) {
        const int64_t k0 = order != nullptr ? order[i] : i;
        const int64_t k1 = order != nullptr ? order[i + 1] : i + 1;
        for (int r = 0; r < m; ++r)
            dst[i / 2 * m + r] = x[r * row_stride + k0] |
                                 static_cast<uint32_t>(x[r * row_stride + k1]) << 16;
    }
}

// out [rows, w.n] (fp32) = x [rows, w.depth] (bf16) @ bf16(W)^T (+ bias), rows at most
// kBlockRows.
template <typename Weights>
void multiply_block_bf16(const uint16_t* x, int64_t x_stride, int64_t rows, const Weights& w,
                         const float* bias, float* out) {
    static constexpr auto kernels = std::array{
        bf16_tile_kernels<1>(std::make_integer_sequence<int, kBf16TileRows>()),
        bf16_tile_kernels<kBf16Panels>(std::make_integer_sequence<int, kBf16TileRows>())};
    const int64_t n = w.n, depth = w.depth, pairs = depth / 2;
    const RowTiles tiles(rows, kBf16TileRows);
    thread_local std::vector<uint32_t> x_pairs;
    x_pairs.resize(static_cast<size_t>(rows * pairs));
    uint32_t* xp = x_pairs.data();
    const int64_t num_panels = (n + kPanelWidth - 1) / kPanelWidth;
    const auto copy = [&](int64_t t) {
        const int64_t row = tiles.first_row(t);
        copy_pairs(x + row * x_stride, x_stride, tiles.rows(t), depth, w.input_order,
                   xp + row * pairs);
    };
    const auto multiply = [&](int64_t begin, int64_t end) {
        float* scratch = panel_buffer(static_cast<size_t>(depth * kPanelWidth));
        thread_local std::vector<uint32_t> buffer;
        buffer.resize(static_cast<size_t>(kBf16Panels * pairs * kPanelWidth));
        for (int64_t p = begin; p < end; p += kBf16Panels) {
            const int count = static_cast<int>(std::min<int64_t>(kBf16Panels, end - p));
            const uint32_t* panels[kBf16Panels];
            int cols[kBf16Panels];
            for (int q = 0; q < count; ++q) {
                uint32_t* panel = buffer.data() + q * pairs * kPanelWidth;
                dequantize_panel_pairs(w.panel(p + q), depth, scratch, panel);
                panels[q] = panel;
                cols[q] = panel_columns(n, p + q);
            }
            for (int64_t t = 0; t < tiles.count; ++t) {
                const int64_t row = tiles.first_row(t);
                kernels[count - 1][tiles.rows(t) - 1](xp + row * pairs, panels, pairs,
                                                      TileOut{out + row * n, n, bias},
                                                      p * kPanelWidth, cols);
            }
        }
    };
    tiles_then_panels(rows * depth * n, tiles.count, num_panels, kBf16Panels, copy, multiply);
}

#endif

// Rows from which bf16 inputs take the dot products, which round every panel to bf16 first:
// below, the fp32 GEMM rounding its weights in registers is faster (AMD Zen 4, SmolLM2's
// layers: at 1 row 4.7 against 13.5 ms a step; at 16 rows the dot products 18.1 against 20.4).
constexpr int64_t kBf16DotMinRows = 8;

// bool: whether this build's CPU runs the bf16 dot products (the avx512 tier's, AVX512-BF16).
bool bf16_dot() {
#if defined(__AVX512F__)
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

// out (fp32) = x (bf16) @ bf16(W)^T (+ bias): the dot products, or the fp32 GEMM on x widened
// (exactly) with the weights rounded to bf16 in registers.
int quantized_linear_bf16(const QuantizedMatrix& w, const uint16_t* x, int64_t x_stride,
                          int64_t rows, const float* bias, float* out) {
    return w.visit<true>([&](const auto& weights) {
#if defined(__AVX512F__)
        if (rows >= kBf16DotMinRows && bf16_dot()) {
            for (int64_t first = 0; first < rows; first += kBlockRows)
                multiply_block_bf16(x + first * x_stride, x_stride,
                                    std::min(kBlockRows, rows - first), weights, bias,
                                    out + first * w.out_features);
            return 0;
        }
#endif
        std::vector<float> widened(static_cast<size_t>(rows * w.in_features));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < w.in_features; ++i)
                widened[r * w.in_features + i] = to_float(x[r * x_stride + i]);
        packed_linear(widened.data(), w.in_features, rows, weights, bias, out);
        return 0;
    });
}

}  // namespace

// Output columns per panel of the packed weight layout (pack_weight's PANEL_WIDTH).
extern "C" int kvpage_panel_width() { return kPanelWidth; }

// out [rows, n] = x [rows, depth] (rows x_stride apart) @ W^T + bias (fp32 [n]; null: none),
// W [n, depth] packed by pack_weight in fp32 (weight_dtype 0) or bf16 (1); x and out fp32, out
// contiguous. Returns 0, or 1 for an unknown dtype.
extern "C" int kvpage_packed_linear(int32_t weight_dtype, const float* x, int64_t x_stride,
                                    int64_t rows, int64_t depth, const void* panels, int64_t n,
                                    const float* bias, float* out) {
    return with_dtype(weight_dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        packed_linear(x, x_stride, rows, DenseWeights<T>{static_cast<const T*>(panels), n, depth},
                      bias, out);
    });
}

// The rows from which kvpage_quantized_linear_bf16 takes AVX512-BF16 dot products here, or 0
// where it never does (they need the avx512 tier's library on a CPU that has them).
extern "C" int64_t kvpage_bf16_dot_rows() { return bf16_dot() ? kBf16DotMinRows : 0; }

// out (fp32) = x (bf16 [rows, in_features], rows x_stride apart) @ W^T (+ bias) for the low-bit
// W (QuantizedPanels) rounded to bf16, the products summed in fp32: with AVX512-BF16 dot
// products from kBf16DotMinRows rows where the CPU has them, else by the fp32 GEMM. Returns 0,
// or 1 for bits other than 4 and 8.
extern "C" int kvpage_quantized_linear_bf16(const QuantizedMatrix* w, const uint16_t* x,
                                            int64_t x_stride, int64_t rows, const float* bias,
                                            float* out) {
    return quantized_linear_bf16(*w, x, x_stride, rows, bias, out);
}

// Likewise for a low-bit W (QuantizedPanels): x's inputs are read in w's input order. Returns 0,
// or 1 for bits other than 4 and 8.
extern "C" int kvpage_quantized_linear(const QuantizedMatrix* w, const float* x, int64_t x_stride,
                                       int64_t rows, const float* bias, float* out) {
    return quantized_linear(*w, x, x_stride, rows, bias, out);
}

extern "C" int64_t kvpage_quantized_rows(const QuantizedMatrix* w, const int64_t* ids, int64_t n,
                                         float* out) {
    return quantized_rows(*w, ids, n, out);
}

// ---- the decoder stack of a Llama-family model for one decode step, in one call -----------
//
// The ops of the per-layer path (rms_norm, GEMMs, rotary, write_kv, decode attention,
// silu_and_mul) in the same order with the same kernels; what it saves is the Python between
// them, slow here because each GEMM streams megabytes of weights through the caches the
// interpreter's own data lives in. The GEMM follows the weights' format: in fp32, packed_linear
// above on weights packed by pack_weight (fp32 panels or low-bit QuantizedPanels), or the packed
// sgemm torch's mkl_linear calls on MKL packs (either way the results are bit-identical to the
// per-layer path's); in bf16
// gemm_bf16bf16f32 on the plain weights (fp32 accumulation rounded to bf16 once, like
// oneDNN's, whose summation order may differ). MKL's are called through addresses the caller
// takes from the MKL inside torch.

namespace {

// MKL's Fortran sgemm_compute and gemm_bf16bf16f32 (column-major).
using SgemmCompute = void (*)(const char* transa, const char* transb, const int32_t* m,
                              const int32_t* n, const int32_t* k, const float* a,
                              const int32_t* lda, const float* b, const int32_t* ldb,
                              const float* beta, float* c, const int32_t* ldc);
using GemmBf16 = void (*)(const char* transa, const char* transb, const int32_t* m,
                          const int32_t* n, const int32_t* k, const float* alpha,
                          const uint16_t* a, const int32_t* lda, const uint16_t* b,
                          const int32_t* ldb, const float* beta, float* c, const int32_t* ldc);

// One projection's LoRA adapters (fused_decoder.LoRAWeights): a [num_slots, shards * rank, in]
// and per shard b [num_slots, sizes[i], rank], in the stack's dtype; a == null: none.
struct LoRAProjection {
    const void* a;
    const void* b[3];
    int64_t sizes[3];
    int64_t shards;
};

struct DecoderLayer {  // one layer's weights (fp32: MKL-packed; bf16: plain) and KV cache
    const void* qkv;
    const void* qkv_bias;  // null: no bias
    const void* o;
    const void* gate_up;
    const void* down;
    const void* input_norm;  // null after the blocks' norms (kNormsAfter)
    const void* post_attention_norm;
    void* k_cache;
    void* v_cache;
    const void* q_norm;  // null: no query and key norms
    const void* k_norm;
    const void* pre_feedforward_norm;   // kNormsAround only
    const void* post_feedforward_norm;  // kNormsAfter and kNormsAround
    LoRAProjection lora[4];  // qkv, o, gate_up, down
    int32_t sliding;     // whether the layer attends within DecoderShape::window
    int32_t local_rope;  // whether it rotates by DecodeStep's local cos and sin
    // A mixture of experts instead of gate_up and down (null: none): the router [num_experts,
    // hidden] in DecoderShape::router_format, and each expert's gate_up and down weights,
    // experts[2 e] and experts[2 e + 1], in the layers' format.
    const void* router;
    const void* const* experts;
};

// DecoderShape::weight_format, fused_decoder.WeightFormat: 0 fp32 MKL packs (sgemm_compute),
// 1 fp32 panels of pack_weight (packed_linear), 2 plain bf16 (gemm_bf16), 3 low-bit panels of
// pack_weight (packed_linear; each weight a QuantizedMatrix).
constexpr int32_t kPanels = 1;
constexpr int32_t kQuantized = 3;
// DecoderShape::qk_norm: 0 none, kHeadNorm each query and key head (Qwen3), kProjectionNorm
// the whole query and key projections (OLMo 2); DecoderShape::norm_placement: 0 before
// attention and the MLP, kNormsAfter after them (OLMo 2), kNormsAround both (Gemma).
constexpr int32_t kHeadNorm = 1;
constexpr int32_t kProjectionNorm = 2;
constexpr int32_t kNormsAfter = 1;
constexpr int32_t kNormsAround = 2;

struct DecoderShape {
    SgemmCompute sgemm_compute;  // used for fp32 MKL packs
    GemmBf16 gemm_bf16;          // used in bf16
    int64_t num_layers, hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size,
        num_slots;
    float eps, scale;
    int32_t window;  // of the sliding layers; 0: none
    int32_t weight_format;
    int64_t lora_num_slots, lora_rank;  // 0: no LoRA
    float residual_multiplier;  // each block's output scaled before the residual add (Granite)
    int32_t qk_norm, norm_placement;
    int32_t activation;  // kSilu or kGeluTanh
    float softcap;       // of the attention scores; 0: none
    int64_t rotary_half;  // rotated pairs of each head: head_dim / 2, fewer for partial rotary
    // Mixture-of-experts layers (0 experts: none): each token's top_k experts of
    // expert_intermediate, their weights renormalized when normalize_top_k; the router's
    // weight format (it stays dense where the experts are low-bit).
    int64_t num_experts, top_k, expert_intermediate;
    int32_t normalize_top_k, router_format;
};

struct DecodeStep {  // this step's batch: one new token per sequence
    int64_t rows;
    const void* cos;  // cos row i at cos + i * cs_stride, sin likewise; head_dim / 2 each
    const void* sin;
    int64_t cs_stride;
    const int64_t* slot_mapping;
    const int32_t* block_tables;
    int64_t table_stride;
    const int32_t* seq_lens;
    const int32_t* query_start_loc;
    const int32_t* lora_slots;  // each row's adapter slot (-1: none, all in range); null: none
    const void* local_cos;      // the sliding layers' own rotation (Gemma 3), or null
    const void* local_sin;
    int64_t local_cs_stride;
};

// out[rows, n] = x[rows, k] @ W^T (+ bias), W [n, k], in fp32 with W in weight format
// `format`: packed_linear on panels (fp32 or low-bit), or as torch's mkl_linear computes it on
// an MKL pack (W packed as the B matrix of a row-major GEMM, column-major out^T = W x^T, the
// bias copied into every row first and added with beta = 1).
void linear_as(int32_t format, const DecoderShape& s, const float* x, int64_t rows, int64_t k,
               const void* w, const void* bias, int64_t n, float* out) {
    const float* b = static_cast<const float*>(bias);
    if (format == kPanels)
        return packed_linear(x, k, rows, DenseWeights<float>{static_cast<const float*>(w), n, k},
                             b, out);
    if (format == kQuantized) {
        quantized_linear(*static_cast<const QuantizedMatrix*>(w), x, k, rows, b, out);
        return;
    }
    if (bias != nullptr)
        for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * n, bias, n * sizeof(float));
    const int32_t m32 = static_cast<int32_t>(n), n32 = static_cast<int32_t>(rows),
                  k32 = static_cast<int32_t>(k);
    const float beta = bias != nullptr ? 1.f : 0.f;
    s.sgemm_compute("P", "N", &m32, &n32, &k32, static_cast<const float*>(w), &k32, x, &k32,
                    &beta, out, &m32);
}

// linear_as in the layers' weight format.
void linear(const DecoderShape& s, const float* x, int64_t rows, int64_t k, const void* w,
            const void* bias, int64_t n, float* out, float*) {
    linear_as(s.weight_format, s, x, rows, k, w, bias, n, out);
}

// bf16 (plain weights, whatever the format): fp32 products and sums (into acc, rows x n), the
// bias added in fp32, then rounded.
void linear(const DecoderShape& s, const uint16_t* x, int64_t rows, int64_t k, const void* w,
            const void* bias, int64_t n, uint16_t* out, float* acc) {
    const uint16_t* b = static_cast<const uint16_t*>(bias);
    if (b != nullptr)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < n; ++j) acc[r * n + j] = to_float(b[j]);
    const int32_t m32 = static_cast<int32_t>(n), n32 = static_cast<int32_t>(rows),
                  k32 = static_cast<int32_t>(k);
    const float alpha = 1.f, beta = b != nullptr ? 1.f : 0.f;
    s.gemm_bf16("T", "N", &m32, &n32, &k32, &alpha, static_cast<const uint16_t*>(w), &k32, x,
                &k32, &beta, acc, &m32);
#pragma omp parallel for if (rows * n > (1 << 15))
    for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[r * n + j] = to_bf16(acc[r * n + j]);
}

// Scratch of a mixture-of-experts block: rows x top_k (row, choice) pairs.
template <typename T>
struct ExpertScratch {
    std::vector<T> logits;             // [rows, num_experts]
    std::vector<float> probs;          // [num_experts]
    std::vector<float> weights;        // [pairs]: each pair's routing weight
    std::vector<int64_t> ids;          // [pairs]: each pair's expert
    std::vector<int64_t> starts;       // [num_experts + 1]: each expert's first grouped pair
    std::vector<int64_t> next;         // [num_experts]: each expert's next free place
    std::vector<int64_t> position;     // [pairs]: where each pair lies once grouped by expert
    std::unique_ptr<T[]> in, gate_up, act, out;  // the grouped pairs' rows through the experts

    ExpertScratch(const DecoderShape& s, int64_t rows) {
        if (s.num_experts == 0) return;
        const int64_t pairs = rows * s.top_k, inner = s.expert_intermediate;
        logits.resize(rows * s.num_experts);
        probs.resize(s.num_experts);
        weights.resize(pairs);
        ids.resize(pairs);
        starts.resize(s.num_experts + 1);
        next.resize(s.num_experts);
        position.resize(pairs);
        in.reset(new T[pairs * s.hidden]);  // not zeroed: every row is written before it is read
        gate_up.reset(new T[pairs * 2 * inner]);
        act.reset(new T[pairs * inner]);
        out.reset(new T[pairs * s.hidden]);
    }
};

// Scratch of one step: activations in T, plus an fp32 GEMM accumulator for bf16.
template <typename T>
struct Scratch {
    T *normed, *qkv, *qk, *attn, *gate_up, *act;
    float *acc, *lora_h;
    std::unique_ptr<T[]> data;
    std::unique_ptr<float[]> acc_data, lora_data;
    ExpertScratch<T> experts;

    Scratch(const DecoderShape& s, int64_t n) : experts(s, n) {
        const int64_t d = s.head_dim, q = s.num_heads * d, kv = s.num_kv_heads * d;
        const int64_t sizes[] = {s.hidden, q + 2 * kv, q + kv, q, 2 * s.intermediate,
                                 s.intermediate};
        int64_t total = 0;
        for (int64_t size : sizes) total += n * size;
        data.reset(new T[total]);
        T* parts[6];
        T* next = data.get();
        for (int i = 0; i < 6; ++i) {
            parts[i] = next;
            next += n * sizes[i];
        }
        normed = parts[0], qkv = parts[1], qk = parts[2], attn = parts[3], gate_up = parts[4],
        act = parts[5];
        if (std::is_same_v<T, float>) {
            acc = nullptr;
        } else {
            const int64_t widest = std::max({n * (q + 2 * kv), n * 2 * s.intermediate,
                                             n * s.num_experts,
                                             n * s.top_k * 2 * s.expert_intermediate,
                                             n * s.top_k * s.hidden});
            acc_data.reset(new float[widest]);
            acc = acc_data.get();
        }
        lora_data.reset(new float[n * 3 * s.lora_rank]);  // the widest shrink: q, k and v
        lora_h = lora_data.get();
    }
};

// out [rows, n] += each row's adapter's delta for x [rows, k], as the layer modules add it
// (lora_shrink over every shard, then lora_expand into each shard's columns).
template <typename T>
void add_lora(const DecoderShape& s, const DecodeStep& b, const LoRAProjection& p, const T* x,
              int64_t rows, int64_t k, T* out, int64_t n, float* h) {
    if (b.lora_slots == nullptr || p.a == nullptr) return;
    const int64_t rank = s.lora_rank, ranks = p.shards * rank;
    lora_shrink(x, k, static_cast<const T*>(p.a), b.lora_slots, h, rows, s.lora_num_slots, ranks,
                k);
    int64_t offset = 0;
    for (int64_t i = 0; i < p.shards; ++i) {
        lora_expand(out + offset, n, h + i * rank, ranks, static_cast<const T*>(p.b[i]),
                    b.lora_slots, rows, s.lora_num_slots, p.sizes[i], rank);
        offset += p.sizes[i];
    }
}

// The queries and keys of qkv [rows, q + 2 * kv] normalized in place, per head or over each
// projection, with the kernels' rms_norm as the layer modules call it.
template <typename T>
void normalize_qk(const DecoderShape& s, const DecoderLayer& w, T* qkv, int64_t rows) {
    const int64_t d = s.head_dim, q_size = s.num_heads * d, kv_size = s.num_kv_heads * d;
    const T* q_norm = static_cast<const T*>(w.q_norm);
    const T* k_norm = static_cast<const T*>(w.k_norm);
    for (int64_t i = 0; i < rows; ++i) {
        T* q = qkv + i * (q_size + 2 * kv_size);
        T* k = q + q_size;
        if (s.qk_norm == kHeadNorm) {
            rms_norm<T>(q, d, nullptr, 0, q_norm, q, nullptr, s.num_heads, d, s.eps);
            rms_norm<T>(k, d, nullptr, 0, k_norm, k, nullptr, s.num_kv_heads, d, s.eps);
        } else {
            rms_norm<T>(q, q_size, nullptr, 0, q_norm, q, nullptr, 1, q_size, s.eps);
            rms_norm<T>(k, kv_size, nullptr, 0, k_norm, k, nullptr, 1, kv_size, s.eps);
        }
    }
}

// x[j] = round(x[j] * m), as torch multiplies a tensor by a number.
template <typename T>
void scale_in_place(T* x, int64_t count, float m) {
    if (m == 1.f) return;
    for (int64_t j = 0; j < count; ++j) store(x + j, to_float(x[j]) * m);
}

// Attention of the rows `in` [rows, hidden]; its output projection goes to `out`. Returns
// -1, or the first row whose slot is past the cache.
template <typename T>
int64_t attention_block(const DecoderShape& s, const DecoderLayer& w, const DecodeStep& b,
                        const T* in, T* out, Scratch<T>& x) {
    const int64_t n = b.rows, d = s.head_dim, q_size = s.num_heads * d;
    const int64_t kv_size = s.num_kv_heads * d, qkv_size = q_size + 2 * kv_size;
    linear(s, in, n, s.hidden, w.qkv, w.qkv_bias, qkv_size, x.qkv, x.acc);
    add_lora(s, b, w.lora[0], in, n, s.hidden, x.qkv, qkv_size, x.lora_h);
    if (s.qk_norm != 0) normalize_qk(s, w, x.qkv, n);
    const bool local = w.local_rope != 0;
    rotary<T>(x.qkv, qkv_size, d, static_cast<const T*>(local ? b.local_cos : b.cos),
              static_cast<const T*>(local ? b.local_sin : b.sin),
              local ? b.local_cs_stride : b.cs_stride, x.qk, n, s.num_heads + s.num_kv_heads, d,
              s.rotary_half);
    const int64_t qk_stride = q_size + kv_size;
    const int64_t bad = kvpage_write_kv(
        reinterpret_cast<const char*>(x.qk + q_size), qk_stride, d,
        reinterpret_cast<const char*>(x.qkv + q_size + kv_size), qkv_size, d,
        static_cast<char*>(w.k_cache), static_cast<char*>(w.v_cache), b.slot_mapping, n,
        s.num_slots, s.num_kv_heads, d, sizeof(T));
    if (bad >= 0) return bad;
    const Problem p{x.qk, qk_stride, d, x.attn, q_size, d, w.k_cache, w.v_cache, b.block_tables,
                    b.table_stride, b.seq_lens, b.query_start_loc, static_cast<int32_t>(n),
                    static_cast<int32_t>(s.num_kv_heads),
                    static_cast<int32_t>(s.num_heads / s.num_kv_heads), static_cast<int32_t>(d),
                    static_cast<int32_t>(s.block_size), s.scale, w.sliding ? s.window : 0,
                    s.softcap};
    dispatch_head_dim<T>(p);
    linear(s, x.attn, n, q_size, w.o, nullptr, s.hidden, out, x.acc);
    add_lora(s, b, w.lora[1], x.attn, n, q_size, out, s.hidden, x.lora_h);
    scale_in_place(out, n * s.hidden, s.residual_multiplier);
    return -1;
}

// The router's GEMM: in fp32 in its own weight format; in bf16 plain, as every bf16 weight.
void router_linear(const DecoderShape& s, const float* x, int64_t rows, const void* w,
                   float* out, float*) {
    linear_as(s.router_format, s, x, rows, s.hidden, w, nullptr, s.num_experts, out);
}
void router_linear(const DecoderShape& s, const uint16_t* x, int64_t rows, const void* w,
                   uint16_t* out, float* acc) {
    linear(s, x, rows, s.hidden, w, nullptr, s.num_experts, out, acc);
}

// A mixture of experts over the rows `in` [rows, hidden] into `out`, op for op as the layer
// module (SparseMoE) computes it: the router's logits; each row's top_k experts and weights
// (route_rows); the (row, choice) pairs grouped by expert, in pair order within each (a stable
// sort); each expert's SiLU-gated MLP over its pairs' rows, with the layers' GEMM; then each
// row's sum over its choices of output times weight, in fp32 from zero in choice order,
// rounded once.
template <typename T>
void moe_block(const DecoderShape& s, const DecoderLayer& w, const DecodeStep& b, const T* in,
               T* out, Scratch<T>& x) {
    const int64_t n = b.rows, k = s.top_k, h = s.hidden, inner = s.expert_intermediate;
    ExpertScratch<T>& m = x.experts;
    router_linear(s, in, n, w.router, m.logits.data(), x.acc);
    route_rows(m.logits.data(), s.num_experts, n, s.num_experts, k, s.normalize_top_k != 0,
               m.probs.data(), m.weights.data(), m.ids.data());
    std::fill(m.starts.begin(), m.starts.end(), 0);
    for (int64_t i = 0; i < n * k; ++i) ++m.starts[m.ids[i] + 1];
    for (int64_t e = 0; e < s.num_experts; ++e) m.starts[e + 1] += m.starts[e];
    std::copy(m.starts.begin(), m.starts.end() - 1, m.next.begin());
    for (int64_t i = 0; i < n * k; ++i) {
        m.position[i] = m.next[m.ids[i]]++;
        std::memcpy(m.in.get() + m.position[i] * h, in + i / k * h, h * sizeof(T));
    }
    for (int64_t e = 0; e < s.num_experts; ++e) {
        const int64_t first = m.starts[e], count = m.starts[e + 1] - first;
        if (count == 0) continue;
        T* gate_up = m.gate_up.get() + first * 2 * inner;
        T* act = m.act.get() + first * inner;
        linear(s, m.in.get() + first * h, count, h, w.experts[2 * e], nullptr, 2 * inner,
               gate_up, x.acc);
        act_and_mul<T, kSilu>(gate_up, 2 * inner, act, count, inner);
        linear(s, act, count, inner, w.experts[2 * e + 1], nullptr, h, m.out.get() + first * h,
               x.acc);
    }
    for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < h; ++j) {
            float sum = 0.f;
            for (int64_t c = 0; c < k; ++c)
                sum += to_float(m.out[m.position[r * k + c] * h + j]) * m.weights[r * k + c];
            store(out + r * h + j, sum);
        }
    scale_in_place(out, n * h, s.residual_multiplier);
}

// The layer's MLP (gated, or a mixture of experts) of the rows `in` [rows, hidden] into `out`.
template <typename T>
void mlp_block(const DecoderShape& s, const DecoderLayer& w, const DecodeStep& b, const T* in,
               T* out, Scratch<T>& x) {
    if (w.router != nullptr) return moe_block(s, w, b, in, out, x);
    const int64_t n = b.rows;
    linear(s, in, n, s.hidden, w.gate_up, nullptr, 2 * s.intermediate, x.gate_up, x.acc);
    add_lora(s, b, w.lora[2], in, n, s.hidden, x.gate_up, 2 * s.intermediate, x.lora_h);
    if (s.activation == kGeluTanh)
        act_and_mul<T, kGeluTanh>(x.gate_up, 2 * s.intermediate, x.act, n, s.intermediate);
    else
        act_and_mul<T, kSilu>(x.gate_up, 2 * s.intermediate, x.act, n, s.intermediate);
    linear(s, x.act, n, s.intermediate, w.down, nullptr, s.hidden, out, x.acc);
    add_lora(s, b, w.lora[3], x.act, n, s.intermediate, out, s.hidden, x.lora_h);
    scale_in_place(out, n * s.hidden, s.residual_multiplier);
}

// One layer with its norms after attention and the MLP (OLMo 2): the residual stream x
// (hidden + residual) goes into attention as it is, x += norm(attention(x)), and the MLP's
// normalized output is left in hidden.
template <typename T>
int64_t decode_layer_norms_after(const DecoderShape& s, const DecoderLayer& w,
                                 const DecodeStep& b, bool first, T* hidden, T* residual,
                                 Scratch<T>& x) {
    const int64_t n = b.rows, count = n * s.hidden;
    if (first)
        std::memcpy(residual, hidden, count * sizeof(T));
    else
        add_rounded(hidden, residual, residual, count);
    const int64_t bad = attention_block(s, w, b, residual, hidden, x);
    if (bad >= 0) return bad;
    rms_norm<T>(hidden, s.hidden, nullptr, 0, static_cast<const T*>(w.post_attention_norm),
                x.normed, nullptr, n, s.hidden, s.eps);
    add_rounded(residual, x.normed, residual, count);
    mlp_block(s, w, b, residual, hidden, x);
    rms_norm<T>(hidden, s.hidden, nullptr, 0, static_cast<const T*>(w.post_feedforward_norm),
                hidden, nullptr, n, s.hidden, s.eps);
    return -1;
}

// One layer: hidden [rows, hidden] (this layer's input, the previous MLP's output) and the
// residual stream are updated in place; `first` means there is no residual yet.
template <typename T>
int64_t decode_layer(const DecoderShape& s, const DecoderLayer& w, const DecodeStep& b,
                     bool first, T* hidden, T* residual, Scratch<T>& x) {
    if (s.norm_placement == kNormsAfter) return decode_layer_norms_after(s, w, b, first, hidden,
                                                                         residual, x);
    const bool around = s.norm_placement == kNormsAround;
    const int64_t n = b.rows;
    const T* in_norm = static_cast<const T*>(w.input_norm);
    if (first) {
        std::memcpy(residual, hidden, n * s.hidden * sizeof(T));
        rms_norm<T>(hidden, s.hidden, nullptr, 0, in_norm, x.normed, nullptr, n, s.hidden, s.eps);
    } else {
        rms_norm<T>(hidden, s.hidden, residual, s.hidden, in_norm, x.normed, residual, n, s.hidden,
                    s.eps);
    }
    const int64_t bad = attention_block(s, w, b, x.normed, hidden, x);
    if (bad >= 0) return bad;
    if (around) {  // hidden = norm(attention), then the MLP's input norm over the residual add
        rms_norm<T>(hidden, s.hidden, nullptr, 0, static_cast<const T*>(w.post_attention_norm),
                    hidden, nullptr, n, s.hidden, s.eps);
        rms_norm<T>(hidden, s.hidden, residual, s.hidden,
                    static_cast<const T*>(w.pre_feedforward_norm), x.normed, residual, n,
                    s.hidden, s.eps);
    } else {
        rms_norm<T>(hidden, s.hidden, residual, s.hidden,
                    static_cast<const T*>(w.post_attention_norm), x.normed, residual, n,
                    s.hidden, s.eps);
    }
    mlp_block(s, w, b, x.normed, hidden, x);
    if (around)
        rms_norm<T>(hidden, s.hidden, nullptr, 0, static_cast<const T*>(w.post_feedforward_norm),
                    hidden, nullptr, n, s.hidden, s.eps);
    return -1;
}

template <typename T>
int64_t decode_stack(const DecoderShape& s, const DecoderLayer* layers, const DecodeStep& step,
                     T* hidden, T* residual) {
    Scratch<T> scratch(s, step.rows);
    for (int64_t l = 0; l < s.num_layers; ++l) {
        const int64_t bad = decode_layer(s, layers[l], step, l == 0, hidden, residual, scratch);
        if (bad >= 0) return bad;
    }
    return -1;
}

}  // namespace

// Runs every layer of the stack for one decode step, in fp32 (dtype 0) or bf16 (dtype 1).
// hidden [rows, hidden] holds the embeddings on entry and the last layer's MLP output on
// return; residual receives the residual stream (the final norm adds the two). Returns -1,
// -2 for an unknown dtype, or the first token whose slot lies past the cache (then nothing
// was written).
extern "C" int64_t kvpage_decoder_stack(int32_t dtype, const DecoderShape* shape,
                                        const DecoderLayer* layers, const DecodeStep* step,
                                        void* hidden, void* residual) {
    int64_t result = -2;
    with_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        result = decode_stack<T>(*shape, layers, *step, static_cast<T*>(hidden),
                                 static_cast<T*>(residual));
    });
    return result;
}
