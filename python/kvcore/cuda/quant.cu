// Quantize/pack and unpack/dequantize blocks in the byte format of docs/layouts.md
// (issue 4), bit-identical to kvcore.quantize (Rust) and kvcore.quant (torch).
//
// Preamble constants (one RawModule per layout):
//   KV_BITS 2|4|8, KV_G group size, KV_T tokens per block, KV_D head_dim,
//   KV_AXIS_TOKEN 0 (channel: group = G consecutive channels of one token) | 1 (token: group =
//   G consecutive tokens of one channel), KV_META_F16 1 (float16 scale/zero) | 0 (float32),
//   KV_IN_DT / KV_OUT_DT element dtypes (0 float32, 1 float16, 2 bfloat16).
//
// One block of T x D values -> KV_NBYTES bytes:
//   [ codes (T*D*bits/8) | zero pad to meta size | scale[NG] | zero[NG] ]
// Code i = g*G + j sits in byte i*bits/8 at bit (i % (8/bits))*bits, LSB first.
// One thread per (block, group); a group's codes fill whole bytes because G*bits % 8 == 0.

#define KV_QMAX ((1 << KV_BITS) - 1)
#define KV_NG (KV_T * KV_D / KV_G)
#define KV_CODES_BYTES (KV_T * KV_D * KV_BITS / 8)
#define KV_META_BYTES (KV_META_F16 ? 2 : 4)
#define KV_SCALES_OFF ((KV_CODES_BYTES + KV_META_BYTES - 1) / KV_META_BYTES * KV_META_BYTES)
#define KV_ZEROS_OFF (KV_SCALES_OFF + KV_NG * KV_META_BYTES)
#define KV_NBYTES (KV_ZEROS_OFF + KV_NG * KV_META_BYTES)

// error bits, checked by the launcher (same order of checks as the references)
#define KV_ERR_NONFINITE 1
#define KV_ERR_ZERO 2
#define KV_ERR_RANGE 4
#define KV_ERR_SCALE 8

// Offset, inside one T x D block, of element j of group g (docs/layouts.md section 2).
__device__ __forceinline__ int kv_group_elem(int g, int j) {
#if KV_AXIS_TOKEN
    return ((g / KV_D) * KV_G + j) * KV_D + (g % KV_D);
#else
    return (g / (KV_D / KV_G)) * KV_D + (g % (KV_D / KV_G)) * KV_G + j;
#endif
}

// v rounded to the metadata dtype and back (M in docs/layouts.md section 4).
__device__ __forceinline__ float kv_meta_round(float v) {
#if KV_META_F16
    return kv_f16_to_f32(kv_f32_to_f16(v));
#else
    return v;
#endif
}

__device__ __forceinline__ void kv_write_meta(unsigned char* out, int off, float v) {
#if KV_META_F16
    unsigned int b = kv_f32_to_f16(v);
    out[off] = (unsigned char)(b & 0xffu);
    out[off + 1] = (unsigned char)(b >> 8);
#else
    unsigned int b = kv_f32_bits(v);
    out[off] = (unsigned char)(b & 0xffu);
    out[off + 1] = (unsigned char)((b >> 8) & 0xffu);
    out[off + 2] = (unsigned char)((b >> 16) & 0xffu);
    out[off + 3] = (unsigned char)(b >> 24);
#endif
}

__device__ __forceinline__ float kv_read_meta(const unsigned char* in, int off) {
#if KV_META_F16
    return kv_f16_to_f32((unsigned short)(in[off] | (in[off + 1] << 8)));
#else
    unsigned int b = (unsigned int)in[off] | ((unsigned int)in[off + 1] << 8) |
                     ((unsigned int)in[off + 2] << 16) | ((unsigned int)in[off + 3] << 24);
    return kv_bits_f32(b);
#endif
}

// x: (num_blocks, T, D) of KV_IN_DT; out: (num_blocks, KV_NBYTES) uint8; err: one int.
extern "C" __global__ void kv_quantize(const void* __restrict__ x, unsigned char* __restrict__ out,
                                       int* __restrict__ err, kv_i64 num_blocks) {
    kv_i64 idx = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= num_blocks * KV_NG) return;
    kv_i64 b = idx / KV_NG;
    int g = (int)(idx % KV_NG);
    kv_i64 xb = b * (kv_i64)(KV_T * KV_D);
    unsigned char* ob = out + b * (kv_i64)KV_NBYTES;

    float lo = 0.0f, hi = 0.0f;
    for (int j = 0; j < KV_G; ++j) {
        float v = kv_load(x, xb + kv_group_elem(g, j), KV_IN_DT);
        if (!kv_isfinite(v)) {
            atomicOr(err, KV_ERR_NONFINITE);
            return;
        }
        if (j == 0 || v < lo) lo = v;
        if (j == 0 || v > hi) hi = v;
    }
    // + 0.0f turns -0 into +0: stored metadata is never -0.
    float zero = __fadd_rn(kv_meta_round(lo), 0.0f);
    if (!kv_isfinite(zero)) {
        atomicOr(err, KV_ERR_ZERO);
        return;
    }
    float rng = hi - zero;
    if (!kv_isfinite(rng)) {
        atomicOr(err, KV_ERR_RANGE);
        return;
    }
    float scale = __fadd_rn(kv_meta_round(__fdiv_rn(rng > 0.0f ? rng : 0.0f, (float)KV_QMAX)), 0.0f);
    if (!kv_isfinite(scale)) {
        atomicOr(err, KV_ERR_SCALE);
        return;
    }

    const int per = 8 / KV_BITS;
    int byte = g * (KV_G * KV_BITS / 8);
    unsigned int acc = 0;
    for (int j = 0; j < KV_G; ++j) {
        unsigned int q = 0;
        if (scale != 0.0f) {
            float v = kv_load(x, xb + kv_group_elem(g, j), KV_IN_DT);
            float r = __fdiv_rn(v - zero, scale);
            r = r < 0.0f ? 0.0f : (r > (float)KV_QMAX ? (float)KV_QMAX : r);
            q = (unsigned int)rintf(r);  // round half to even
        }
        acc |= q << ((j % per) * KV_BITS);
        if (j % per == per - 1) {
            ob[byte++] = (unsigned char)acc;
            acc = 0;
        }
    }
    kv_write_meta(ob, KV_SCALES_OFF + g * KV_META_BYTES, scale);
    kv_write_meta(ob, KV_ZEROS_OFF + g * KV_META_BYTES, zero);
    if (g == 0) {
        for (int p = KV_CODES_BYTES; p < KV_SCALES_OFF; ++p) ob[p] = 0;
    }
}

// blocks: (num_blocks, KV_NBYTES) uint8 -> out: (num_blocks, T, D) of KV_OUT_DT,
// x' = float(code) * scale + zero (a product then a sum, never fused).
extern "C" __global__ void kv_dequantize(const unsigned char* __restrict__ blocks,
                                         void* __restrict__ out, kv_i64 num_blocks) {
    kv_i64 idx = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= num_blocks * KV_NG) return;
    kv_i64 b = idx / KV_NG;
    int g = (int)(idx % KV_NG);
    const unsigned char* ib = blocks + b * (kv_i64)KV_NBYTES;
    float scale = kv_read_meta(ib, KV_SCALES_OFF + g * KV_META_BYTES);
    float zero = kv_read_meta(ib, KV_ZEROS_OFF + g * KV_META_BYTES);
    kv_i64 ob = b * (kv_i64)(KV_T * KV_D);
    for (int j = 0; j < KV_G; ++j) {
        int i = g * KV_G + j;
        unsigned int code = (ib[i * KV_BITS / 8] >> ((i % (8 / KV_BITS)) * KV_BITS)) & KV_QMAX;
        float y = __fadd_rn(__fmul_rn((float)code, scale), zero);
        kv_store(out, ob + kv_group_elem(g, j), KV_OUT_DT, y);
    }
}
