// RoPE re-rotation of stored keys by position deltas (issue 5's rotate_keys), in place in a
// paged pool, rotate_half convention:
//
//   key = [x1 | x2 | rest]   x1, x2: R/2 channels each, rest (D - R channels) untouched
//   a   = delta * inv_freq[i]            (float64, as the torch reference)
//   x1' = x1 cos a - x2 sin a,   x2' = x2 cos a + x1 sin a
//
// One thread per (key, i < R/2): it owns channels i and i + R/2, so in place is safe.
// Preamble: KV_DT pool dtype, KV_D head_dim, KV_HALF = R/2 (len(inv_freq)).

extern "C" __global__ void kv_rope_rotate(
    void* __restrict__ pool,              // rows of KV_D elements, one per slot
    const kv_i64* __restrict__ slots,     // (n,) slots to rotate
    const kv_i64* __restrict__ delta,     // (n,) new position - old position
    const float* __restrict__ inv_freq,   // (KV_HALF,) this layer's frequencies
    kv_i64 n) {
    kv_i64 idx = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * KV_HALF) return;
    kv_i64 t = idx / KV_HALF;
    int i = (int)(idx % KV_HALF);
    kv_i64 row = slots[t] * (kv_i64)KV_D;
    double a = (double)delta[t] * (double)inv_freq[i];
    double c = cos(a), s = sin(a);
    double x1 = (double)kv_load(pool, row + i, KV_DT);
    double x2 = (double)kv_load(pool, row + i + KV_HALF, KV_DT);
    // separate roundings (no fused multiply-add), as the reference's k * cos + rot * sin
    kv_store(pool, row + i, KV_DT, (float)__dadd_rn(__dmul_rn(x1, c), __dmul_rn(-x2, s)));
    kv_store(pool, row + i + KV_HALF, KV_DT, (float)__dadd_rn(__dmul_rn(x2, c), __dmul_rn(x1, s)));
}
