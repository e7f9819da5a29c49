// Compaction: apply the allocator's compaction plans to paged pools in place.
//
// Every tensor is seen as rows of bytes, one row per slot (slot = block_id * block_size +
// offset): a K or V pool (num_blocks, block_size, head_dim) has rows of head_dim elements,
// per-slot state (positions int64, scores float32, valid bool, merge counts) rows of one.
// One launch moves every tensor of every layer of a step:
//
//   tensor t (blockIdx.y) belongs to plan group[t] (its layer); that plan is the moves
//   indptr[group] .. indptr[group+1] of (src, dst):   row[dst[i]] = row[src[i]]
//
// Each thread owns one `unit`-byte column of one tensor and walks that tensor's moves in
// order. So the moves of a column run exactly in plan order, and any plan is safe, including
// overlapping source and destination ranges (the allocator guarantees no move reads a slot an
// earlier move wrote, but in-order execution does not even need that).
//
// unit[t] in {1, 2, 4, 8, 16} bytes divides the row size and the base address (the launcher
// picks the widest); columns are contiguous across threads, so a warp reads whole rows.

// alignas(16): one 16-byte load and store per unit, not two 8-byte ones
struct alignas(16) kv_u128 { unsigned long long a, b; };

extern "C" __global__ void kv_compact(
    const kv_u64* __restrict__ ptrs,      // (num_tensors,) base addresses
    const kv_i64* __restrict__ row_units, // (num_tensors,) units per row
    const int* __restrict__ unit,         // (num_tensors,) bytes per unit
    const int* __restrict__ group,        // (num_tensors,) plan of each tensor
    const kv_i64* __restrict__ src,       // (num_moves,) source slots
    const kv_i64* __restrict__ dst,       // (num_moves,) destination slots
    const kv_i64* __restrict__ indptr,    // (num_groups + 1,) moves of each plan
    int num_tensors) {
    int t = (int)blockIdx.y;
    if (t >= num_tensors) return;
    kv_i64 col = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    kv_i64 n = row_units[t];
    if (col >= n) return;
    int g = group[t];
    kv_i64 begin = indptr[g], end = indptr[g + 1];
    char* base = (char*)ptrs[t];
    switch (unit[t]) {
    case 16: {
        kv_u128* p = (kv_u128*)base;
        for (kv_i64 i = begin; i < end; ++i) p[dst[i] * n + col] = p[src[i] * n + col];
        break;
    }
    case 8: {
        unsigned long long* p = (unsigned long long*)base;
        for (kv_i64 i = begin; i < end; ++i) p[dst[i] * n + col] = p[src[i] * n + col];
        break;
    }
    case 4: {
        unsigned int* p = (unsigned int*)base;
        for (kv_i64 i = begin; i < end; ++i) p[dst[i] * n + col] = p[src[i] * n + col];
        break;
    }
    case 2: {
        unsigned short* p = (unsigned short*)base;
        for (kv_i64 i = begin; i < end; ++i) p[dst[i] * n + col] = p[src[i] * n + col];
        break;
    }
    default: {
        unsigned char* p = (unsigned char*)base;
        for (kv_i64 i = begin; i < end; ++i) p[dst[i] * n + col] = p[src[i] * n + col];
        break;
    }
    }
}
