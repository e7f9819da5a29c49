// Compaction: apply the allocator's compaction plans to paged pools in place.
//
// Every tensor is seen as one piece of bytes per slot (slot = block_id * block_size + offset).
// A dense tensor has one row per slot: a K or V pool (num_blocks, block_size, head_dim) has
// rows of head_dim elements, per-slot state (positions int64, scores float32, valid bool, merge
// counts) rows of one. A quantized page (docs/layouts.md) keeps a token's codes, scales and
// zero points in three regions of its page, so each region is one strided tensor of pieces:
//
//   page b:  | codes: tok 0 | tok 1 | ... | pad | scales: tok 0 | tok 1 | ... | zeros: ...
//            ^ region base + b * page       ^ region base + b * page + o * step
//
//   piece of slot s = base + (s / per_page) * page + (s % per_page) * step   (in units)
//   dense tensor:     per_page = 1, page = units per row (one row per slot)
//
// One launch moves every tensor of every layer of a step:
//
//   tensor t (blockIdx.y) belongs to plan group[t] (its layer); that plan is the moves
//   indptr[group] .. indptr[group+1] of (src, dst):   piece[dst[i]] = piece[src[i]]
//
// Each thread owns one `unit`-byte column of one tensor and walks that tensor's moves in
// order. So the moves of a column run exactly in plan order, and any plan is safe, including
// overlapping source and destination ranges (the allocator guarantees no move reads a slot an
// earlier move wrote, but in-order execution does not even need that).
//
// unit[t] in {1, 2, 4, 8, 16} bytes divides the piece size, the base address and both strides
// (the launcher picks the widest); columns are contiguous across threads, so a warp reads
// whole pieces.

// alignas(16): one 16-byte load and store per unit, not two 8-byte ones
struct alignas(16) kv_u128 { unsigned long long a, b; };

// The first unit of slot s's piece, counted in units from the tensor's base.
__device__ __forceinline__ kv_i64 kv_piece(kv_i64 s, kv_i64 per_page, kv_i64 page, kv_i64 step) {
    if (per_page == 1) return s * page;  // dense rows: no 64-bit division
    return (s / per_page) * page + (s % per_page) * step;
}

template <class U>
__device__ __forceinline__ void kv_move(char* base, const kv_i64* __restrict__ src,
                                        const kv_i64* __restrict__ dst, kv_i64 begin, kv_i64 end,
                                        kv_i64 col, kv_i64 per_page, kv_i64 page, kv_i64 step) {
    U* p = (U*)base;
    for (kv_i64 i = begin; i < end; ++i)
        p[kv_piece(dst[i], per_page, page, step) + col] =
            p[kv_piece(src[i], per_page, page, step) + col];
}

extern "C" __global__ void kv_compact(
    const kv_u64* __restrict__ ptrs,      // (num_tensors,) base address of slot 0's piece
    const kv_i64* __restrict__ geom,      // (num_tensors, 4) in units: piece, page, step,
                                          //   and slots per page (1: dense rows)
    const int* __restrict__ unit,         // (num_tensors,) bytes per unit
    const int* __restrict__ group,        // (num_tensors,) plan of each tensor
    const kv_i64* __restrict__ src,       // (num_moves,) source slots
    const kv_i64* __restrict__ dst,       // (num_moves,) destination slots
    const kv_i64* __restrict__ indptr,    // (num_groups + 1,) moves of each plan
    int num_tensors) {
    int t = (int)blockIdx.y;
    if (t >= num_tensors) return;
    kv_i64 col = (kv_i64)blockIdx.x * blockDim.x + threadIdx.x;
    kv_i64 n = geom[4 * t], page = geom[4 * t + 1], step = geom[4 * t + 2];
    kv_i64 per_page = geom[4 * t + 3];
    if (col >= n) return;
    int g = group[t];
    kv_i64 begin = indptr[g], end = indptr[g + 1];
    char* base = (char*)ptrs[t];
    switch (unit[t]) {
    case 16: kv_move<kv_u128>(base, src, dst, begin, end, col, per_page, page, step); break;
    case 8: kv_move<unsigned long long>(base, src, dst, begin, end, col, per_page, page, step); break;
    case 4: kv_move<unsigned int>(base, src, dst, begin, end, col, per_page, page, step); break;
    case 2: kv_move<unsigned short>(base, src, dst, begin, end, col, per_page, page, step); break;
    default: kv_move<unsigned char>(base, src, dst, begin, end, col, per_page, page, step); break;
    }
}
