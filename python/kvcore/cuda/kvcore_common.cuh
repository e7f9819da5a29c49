// Shared device helpers, prepended to every kernel source by kvcore.cuda (after the #define
// preamble). No #include: NVRTC then needs no CUDA headers, and cuda/emu/cuda_emu.h can compile
// the same text with g++ for the CPU tests.
//
// Element dtypes are selected by preamble constants: 0 = float32, 1 = float16, 2 = bfloat16.
// 16-bit values travel as unsigned short bits and are converted here in integer arithmetic, so
// the rounding is exactly IEEE round-to-nearest-even on both the GPU and the CPU emulation.

#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2

typedef long long kv_i64;
typedef unsigned long long kv_u64;

__device__ __forceinline__ unsigned int kv_f32_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float kv_bits_f32(unsigned int u) { return __uint_as_float(u); }

// binary16 bits -> float32 (exact).
__device__ __forceinline__ float kv_f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exp = ((unsigned int)h >> 10) & 0x1fu;
    unsigned int man = (unsigned int)h & 0x3ffu;
    if (exp == 0x1fu) return kv_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return kv_bits_f32(sign);
        // subnormal: man * 2^-24, exact in float32
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return kv_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// float32 -> binary16 bits, round to nearest even; overflow gives inf, NaN stays NaN.
__device__ __forceinline__ unsigned short kv_f32_to_f16(float f) {
    unsigned int u = kv_f32_bits(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: rounds to inf
    if (a < 0x38800000u) {                                           // below 2^-14: subnormal
        if (a < 0x33000000u) return (unsigned short)sign;             // below 2^-25: +-0
        unsigned int e = a >> 23;
        unsigned int m = (a & 0x7fffffu) | 0x800000u;
        unsigned int shift = 126u - e;  // result = m >> (shift), with rne
        unsigned int q = m >> shift;
        unsigned int rem = m & ((1u << shift) - 1u);
        unsigned int half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q += 1u;
        return (unsigned short)(sign | q);
    }
    unsigned int q = (a - 0x38000000u) >> 13;  // rebias 127 -> 15
    unsigned int rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q += 1u;
    return (unsigned short)(sign | q);
}

__device__ __forceinline__ float kv_bf16_to_f32(unsigned short h) {
    return kv_bits_f32(((unsigned int)h) << 16);
}

// float32 -> bfloat16 bits, round to nearest even (NaN kept quiet).
__device__ __forceinline__ unsigned short kv_f32_to_bf16(float f) {
    unsigned int u = kv_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Load element i of an array of dtype `dt` as float32; store a float32 into it.
__device__ __forceinline__ float kv_load(const void* p, kv_i64 i, int dt) {
    if (dt == KV_F32) return ((const float*)p)[i];
    unsigned short h = ((const unsigned short*)p)[i];
    return dt == KV_F16 ? kv_f16_to_f32(h) : kv_bf16_to_f32(h);
}

__device__ __forceinline__ void kv_store(void* p, kv_i64 i, int dt, float v) {
    if (dt == KV_F32) {
        ((float*)p)[i] = v;
    } else {
        ((unsigned short*)p)[i] = dt == KV_F16 ? kv_f32_to_f16(v) : kv_f32_to_bf16(v);
    }
}

__device__ __forceinline__ bool kv_isfinite(float v) {
    return (kv_f32_bits(v) & 0x7f800000u) != 0x7f800000u;
}
