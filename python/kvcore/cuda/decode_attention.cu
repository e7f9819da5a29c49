// Decode attention over the paged cache, split along the keys (flash-decoding), two kernels:
//
//   kv_decode_partial  grid (num_splits, B * H): CTA (split s, stream b*H + h) reads the
//                      stream's tokens [s * split_len, (s+1) * split_len) page by page and
//                      keeps, for each of its ROWS = KV_GROUP * KV_QLEN query rows, an online
//                      softmax (max m, sum l, acc[D]) that it writes to the workspace;
//   kv_decode_reduce   grid (B * H * ROWS): merges the splits of one row into the output
//                      (and, optionally, the row's log-sum-exp).
//
// Rows: query head hq = h * KV_GROUP + r / KV_QLEN (GQA), query token t = r % KV_QLEN. The
// step's keys are already stored: token t of a chunk of KV_QLEN sees stored tokens
// [0, len - KV_QLEN + t + 1) of its stream (len = lengths[stream]); KV_QLEN = 1 is decode.
//
//   block_table[stream, p] -> block id;  token j lives in slot block * KV_BS + j % KV_BS
//
// Pages: KV_K_QUANT / KV_V_QUANT 0: rows of KV_D elements of dtype KV_DT; 1: one quantized
// block per page, (num_blocks, nbytes) uint8 in the layout (KV_K_BITS, KV_K_G, KV_BS, KV_D,
// axis KV_K_AXIS_TOKEN, meta KV_META_F16) of docs/layouts.md for keys (KV_V_* for values),
// dequantized in registers. Optional per-slot inputs: KV_HAS_BIAS (float32 logit bias, the log-count of
// merged slots) and KV_HAS_VALID (uint8, 0 masks the slot).
//
// Each of the 4 warps takes every 4th run of KV_UNROLL consecutive tokens, loading a run's keys
// and values before it scores any of them (the first version took one token at a time, so a
// warp had one token's loads in flight: on an H200 it ran at 0.10x SDPA, docs/kernels.md);
// lane l holds channels l, l + 32, ... (KV_D / 32 of them). Scores are float32; -inf masking;
// a row with no visible key outputs zeros.

#define KV_WARPS 4
#define KV_UNROLL 4
#define KV_ROWS (KV_GROUP * KV_QLEN)
#define KV_PER_LANE (KV_D / 32)
#define KV_NEG_INF (-__int_as_float(0x7f800000))

#if KV_K_QUANT || KV_V_QUANT
#define KV_META_BYTES (KV_META_F16 ? 2 : 4)

__device__ __forceinline__ float kv_meta_at(const unsigned char* p, int off) {
#if KV_META_F16
    return kv_f16_to_f32((unsigned short)(p[off] | (p[off + 1] << 8)));
#else
    return kv_bits_f32((unsigned int)p[off] | ((unsigned int)p[off + 1] << 8) |
                       ((unsigned int)p[off + 2] << 16) | ((unsigned int)p[off + 3] << 24));
#endif
}

// Bytes of one quantized page of KV_BS x KV_D values (docs/layouts.md section 3).
__device__ __forceinline__ int kv_page_bytes(int bits, int group) {
    int codes = KV_BS * KV_D * bits / 8;
    int scales = (codes + KV_META_BYTES - 1) / KV_META_BYTES * KV_META_BYTES;
    return scales + 2 * (KV_BS * KV_D / group) * KV_META_BYTES;
}

// Element (token off, channel c) of one quantized page, as code * scale + zero. bits, group
// and axis are compile-time constants at every call site, so this folds to a few integer ops.
__device__ __forceinline__ float kv_qget(const unsigned char* page, int off, int c, int bits,
                                         int group, int axis_token) {
    int g, j;
    if (axis_token) {
        g = (off / group) * KV_D + c;
        j = off % group;
    } else {
        g = off * (KV_D / group) + c / group;
        j = c % group;
    }
    int i = g * group + j;
    int codes = KV_BS * KV_D * bits / 8;
    int scales = (codes + KV_META_BYTES - 1) / KV_META_BYTES * KV_META_BYTES;
    int zeros = scales + (KV_BS * KV_D / group) * KV_META_BYTES;
    unsigned int code = (page[i * bits / 8] >> ((i % (8 / bits)) * bits)) & ((1u << bits) - 1u);
    float scale = kv_meta_at(page, scales + g * KV_META_BYTES);
    float zero = kv_meta_at(page, zeros + g * KV_META_BYTES);
    return __fadd_rn(__fmul_rn((float)code, scale), zero);
}
#endif

__device__ __forceinline__ float kv_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float kv_page_get(const void* pool, kv_i64 block, int off, int c,
                                             int quant, int bits, int group, int axis_token) {
#if KV_K_QUANT || KV_V_QUANT
    if (quant)
        return kv_qget((const unsigned char*)pool + block * (kv_i64)kv_page_bytes(bits, group),
                       off, c, bits, group, axis_token);
#endif
    return kv_load(pool, (block * KV_BS + off) * (kv_i64)KV_D + c, KV_DT);
}

extern "C" __global__ void __launch_bounds__(KV_WARPS * 32) kv_decode_partial(
    const void* __restrict__ query,        // (B, Hq, KV_QLEN, KV_D) KV_DT, Hq = H * KV_GROUP
    const void* __restrict__ k_pool,       // pages, see above
    const void* __restrict__ v_pool,
    const kv_i64* __restrict__ block_table,  // (B * H, width)
    const kv_i64* __restrict__ lengths,      // (B * H,)
    const float* __restrict__ slot_bias,     // (num_slots,) or unused
    const unsigned char* __restrict__ slot_valid,  // (num_slots,) or unused
    float* __restrict__ ws_acc,            // (B * H, splits, ROWS, KV_D)
    float* __restrict__ ws_ml,             // (B * H, splits, ROWS, 2): max, sum
    kv_i64 width, kv_i64 split_len, float scale) {
    __shared__ float q_s[KV_ROWS][KV_D];
    __shared__ float red_m[KV_WARPS][KV_ROWS];
    __shared__ float red_l[KV_WARPS][KV_ROWS];
    __shared__ float red_acc[KV_WARPS][KV_ROWS][KV_D];

    const int split = blockIdx.x, num_splits = gridDim.x;
    const kv_i64 stream = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const kv_i64 len = lengths[stream];

    // query rows of this kv head, scaled, in shared memory
    const kv_i64 q_base = stream * (kv_i64)KV_ROWS * KV_D;  // (b, h*G + g, t) rows are adjacent
    for (int e = threadIdx.x; e < KV_ROWS * KV_D; e += KV_WARPS * 32)
        q_s[e / KV_D][e % KV_D] = kv_load(query, q_base + e, KV_DT) * scale;
    __syncthreads();

    float m[KV_ROWS], l[KV_ROWS], acc[KV_ROWS][KV_PER_LANE];
    for (int r = 0; r < KV_ROWS; ++r) {
        m[r] = KV_NEG_INF;
        l[r] = 0.0f;
        for (int k = 0; k < KV_PER_LANE; ++k) acc[r][k] = 0.0f;
    }

    kv_i64 begin = (kv_i64)split * split_len;
    kv_i64 end = begin + split_len < len ? begin + split_len : len;
    // Warp w takes runs of KV_UNROLL consecutive tokens, every KV_WARPS-th run. It first loads
    // the whole run's keys and values (all of those loads in flight at once), then folds the
    // tokens into the online softmax one by one, in token order.
    for (kv_i64 j0 = begin + warp * KV_UNROLL; j0 < end; j0 += KV_WARPS * KV_UNROLL) {
        float kr[KV_UNROLL][KV_PER_LANE], vr[KV_UNROLL][KV_PER_LANE], bias[KV_UNROLL];
        bool live[KV_UNROLL];  // the same for every lane of the warp
        for (int u = 0; u < KV_UNROLL; ++u) {
            kv_i64 j = j0 + u;
            live[u] = j < end;
            bias[u] = 0.0f;
            if (!live[u]) continue;
            kv_i64 block = block_table[stream * width + j / KV_BS];
            int off = (int)(j % KV_BS);
            kv_i64 slot = block * KV_BS + off;
#if KV_HAS_VALID
            if (!slot_valid[slot]) {
                live[u] = false;
                continue;
            }
#endif
#if KV_HAS_BIAS
            bias[u] = slot_bias[slot];
            if (bias[u] == KV_NEG_INF) {  // a slot of mass 0 gets no weight
                live[u] = false;
                continue;
            }
#endif
            for (int k = 0; k < KV_PER_LANE; ++k) {
                kr[u][k] = kv_page_get(k_pool, block, off, lane + 32 * k, KV_K_QUANT, KV_K_BITS,
                                       KV_K_G, KV_K_AXIS_TOKEN);
                vr[u][k] = kv_page_get(v_pool, block, off, lane + 32 * k, KV_V_QUANT, KV_V_BITS,
                                       KV_V_G, KV_V_AXIS_TOKEN);
            }
        }
        for (int u = 0; u < KV_UNROLL; ++u) {
            if (!live[u]) continue;
            kv_i64 j = j0 + u;
            for (int r = 0; r < KV_ROWS; ++r) {
                int t = r % KV_QLEN;
                if (j >= len - KV_QLEN + t + 1) continue;  // causal inside the chunk
                float dot = 0.0f;
                for (int k = 0; k < KV_PER_LANE; ++k) dot += q_s[r][lane + 32 * k] * kr[u][k];
                float s = kv_warp_sum(dot) + bias[u];
                float m_new = s > m[r] ? s : m[r];
                float corr = __expf(m[r] - m_new);  // m[r] = -inf: exp(-inf) = 0
                float p = __expf(s - m_new);
                l[r] = l[r] * corr + p;
                for (int k = 0; k < KV_PER_LANE; ++k) acc[r][k] = acc[r][k] * corr + p * vr[u][k];
                m[r] = m_new;
            }
        }
    }

    // merge the warps of this CTA
    for (int r = 0; r < KV_ROWS; ++r) {
        if (lane == 0) {
            red_m[warp][r] = m[r];
            red_l[warp][r] = l[r];
        }
        for (int k = 0; k < KV_PER_LANE; ++k) red_acc[warp][r][lane + 32 * k] = acc[r][k];
    }
    __syncthreads();
    kv_i64 ws_row = (stream * num_splits + split) * (kv_i64)KV_ROWS;
    for (int e = threadIdx.x; e < KV_ROWS * KV_D; e += KV_WARPS * 32) {
        int r = e / KV_D, c = e % KV_D;
        float mm = KV_NEG_INF;
        for (int w = 0; w < KV_WARPS; ++w) mm = red_m[w][r] > mm ? red_m[w][r] : mm;
        float ll = 0.0f, aa = 0.0f;
        if (mm != KV_NEG_INF) {
            for (int w = 0; w < KV_WARPS; ++w) {
                float f = red_m[w][r] == KV_NEG_INF ? 0.0f : __expf(red_m[w][r] - mm);
                ll += red_l[w][r] * f;
                aa += red_acc[w][r][c] * f;
            }
        }
        ws_acc[(ws_row + r) * KV_D + c] = aa;
        if (c == 0) {
            ws_ml[(ws_row + r) * 2] = mm;
            ws_ml[(ws_row + r) * 2 + 1] = ll;
        }
    }
}

// out: (B, KV_QLEN, Hq, KV_D) KV_DT; one CTA per (stream, row), threads over channels.
// lse: optional (B, KV_QLEN, Hq) float32 (null: not written), the log-sum-exp of the row's
// scaled, biased logits (-inf when no key is visible), so that a caller can merge this
// attention with one over other keys (KIVI's full-precision residual window).
extern "C" __global__ void kv_decode_reduce(const float* __restrict__ ws_acc,
                                            const float* __restrict__ ws_ml,
                                            void* __restrict__ out, float* __restrict__ lse,
                                            int num_splits, kv_i64 num_kv_heads) {
    const kv_i64 stream = blockIdx.x / KV_ROWS;
    const int r = blockIdx.x % KV_ROWS;
    const kv_i64 b = stream / num_kv_heads, h = stream % num_kv_heads;
    const kv_i64 hq = h * KV_GROUP + r / KV_QLEN, t = r % KV_QLEN;
    const kv_i64 num_q_heads = num_kv_heads * KV_GROUP;
    float mm = KV_NEG_INF;
    for (int s = 0; s < num_splits; ++s) {
        float v = ws_ml[((stream * num_splits + s) * KV_ROWS + r) * 2];
        mm = v > mm ? v : mm;
    }
    kv_i64 o = ((b * KV_QLEN + t) * num_q_heads + hq) * KV_D;
    if (lse != nullptr && threadIdx.x == 0) {
        float ll = 0.0f;
        if (mm != KV_NEG_INF) {
            for (int s = 0; s < num_splits; ++s) {
                kv_i64 row = (stream * num_splits + s) * KV_ROWS + r;
                float ms = ws_ml[row * 2];
                ll += ms == KV_NEG_INF ? 0.0f : ws_ml[row * 2 + 1] * __expf(ms - mm);
            }
        }
        lse[o / KV_D] = ll > 0.0f ? mm + logf(ll) : KV_NEG_INF;
    }
    for (int c = threadIdx.x; c < KV_D; c += blockDim.x) {
        float ll = 0.0f, aa = 0.0f;
        if (mm != KV_NEG_INF) {
            for (int s = 0; s < num_splits; ++s) {
                kv_i64 row = (stream * num_splits + s) * KV_ROWS + r;
                float ms = ws_ml[row * 2];
                float f = ms == KV_NEG_INF ? 0.0f : __expf(ms - mm);
                ll += ws_ml[row * 2 + 1] * f;
                aa += ws_acc[row * KV_D + c] * f;
            }
        }
        kv_store(out, o + c, KV_DT, ll > 0.0f ? aa / ll : 0.0f);
    }
}
