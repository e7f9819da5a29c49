// Apply a merge plan (docs/merging.md, issue 4) to the rows of one stream.
//
//   out[d] = sum over the plan's entries (s, d, w), in plan order, of w * x[s]   (float32)
//   out[r] = x[r]                      for rows that are no destination (out starts as x)
//   counts_out[d] = counts[d] + sum frac * counts[s]   frac = w / (total weight leaving s)
//                                                      for a removed source s, else 0
//   counts_out[r] = 0 for removed slots r (merged away or evicted)
//
// The launcher sorts the entries by destination (stable, so each destination keeps plan
// order) into CSR form: destination k is dst_rows[k], its entries indptr[k] .. indptr[k+1].
// One thread per (destination, column); thread column 0 also does the counts. Products and
// sums are separate roundings (__fmul_rn/__fadd_rn) like MergePlan.apply in Rust.
// Preamble: KV_DT element dtype of x and out (0 float32, 1 float16, 2 bfloat16).

extern "C" __global__ void kv_merge(
    const void* __restrict__ x,              // (num_rows, dim) KV_DT
    void* __restrict__ out,                  // (num_rows, dim) KV_DT, a copy of x on entry
    const kv_i64* __restrict__ dst_rows,     // (num_dst,)
    const kv_i64* __restrict__ indptr,       // (num_dst + 1,)
    const kv_i64* __restrict__ src,          // (num_entries,) sorted by destination
    const float* __restrict__ weight,        // (num_entries,)
    const float* __restrict__ mass_frac,     // (num_entries,) or null without counts
    const float* __restrict__ counts,        // (num_rows,) or null
    float* __restrict__ counts_out,          // (num_rows,) or null, a copy of counts on entry
    const kv_i64* __restrict__ removed,      // (num_removed,) or null
    kv_i64 num_dst, kv_i64 dim, kv_i64 num_removed) {
    kv_i64 idx = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < num_dst * dim) {
        kv_i64 k = idx / dim, c = idx % dim;
        kv_i64 d = dst_rows[k];
        float acc = 0.0f;
        for (kv_i64 e = indptr[k]; e < indptr[k + 1]; ++e)
            acc = __fadd_rn(acc, __fmul_rn(weight[e], kv_load(x, src[e] * dim + c, KV_DT)));
        kv_store(out, d * dim + c, KV_DT, acc);
        if (c == 0 && counts != 0) {
            float m = counts[d];
            for (kv_i64 e = indptr[k]; e < indptr[k + 1]; ++e)
                m = __fadd_rn(m, __fmul_rn(mass_frac[e], counts[src[e]]));
            counts_out[d] = m;
        }
    } else if (counts != 0 && idx - num_dst * dim < num_removed) {
        counts_out[removed[idx - num_dst * dim]] = 0.0f;
    }
}
