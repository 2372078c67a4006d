// Element types of the kvpage CUDA kernels and their fp32 conversions.
// Self-contained (no CUDA headers), so the same source builds with NVRTC and `nvcc -ptx`.
#pragma once

typedef unsigned short kv_u16;

struct Fp32 {
  typedef float storage;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

struct Fp16 {
  typedef kv_u16 storage;
  static __device__ __forceinline__ float load(kv_u16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
  }
  static __device__ __forceinline__ kv_u16 store(float x) {
    kv_u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
  }
};

struct Bf16 {
  typedef kv_u16 storage;
  static __device__ __forceinline__ float load(kv_u16 x) {
    return __uint_as_float(((unsigned int)x) << 16);
  }
  // Round to nearest even; NaN stays a (quiet) NaN.
  static __device__ __forceinline__ kv_u16 store(float x) {
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (kv_u16)0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (kv_u16)(bits >> 16);
  }
};

#define KV_NEG_INF __int_as_float(0xff800000)
