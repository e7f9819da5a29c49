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
// One CTA per tensor walks that tensor's moves in chunks. A piece is n units of `unit` bytes,
// so the plan is a row of (move, column) elements, element q = (i - begin) * n + column; a
// chunk is KV_CHUNK * blockDim.x consecutive elements, and consecutive threads take
// consecutive elements, so a warp reads and writes whole pieces. Each thread first loads its
// KV_CHUNK elements of the chunk into registers (all of those loads in flight at once), the
// CTA waits at a barrier, then every thread stores them, and a second barrier closes the
// chunk. (The first version had one thread per column walk the moves one at a time: on an
// H200 that ran at 1.9 % of the copy bandwidth, docs/kernels.md.)
//
// Order: within a chunk every read comes before every write, and chunks run in plan order.
// So a move may read a slot that a later move overwrites (source and destination ranges
// overlap: the order-preserving shifts of a compaction), whether the later move is in the
// same chunk or a later one. What the allocator rules out (docs/allocator.md: no move reads a
// slot that an earlier move wrote) is the one order a chunk does not keep.
//
// unit[t] in {1, 2, 4, 8, 16} bytes divides the piece size, the base address and both strides
// (the launcher picks the widest).

#define KV_CHUNK 8  // elements per thread per chunk: loads each thread keeps in flight

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
                                        kv_i64 n, kv_i64 per_page, kv_i64 page, kv_i64 step) {
    U* p = (U*)base;
    const kv_i64 total = (end - begin) * n, threads = blockDim.x;
    for (kv_i64 first = 0; first < total; first += KV_CHUNK * threads) {
        U v[KV_CHUNK];
        kv_i64 at[KV_CHUNK];  // each element's destination unit; -1: past the plan's end
        for (int k = 0; k < KV_CHUNK; ++k) {
            kv_i64 q = first + k * threads + threadIdx.x;
            at[k] = -1;
            if (q < total) {
                kv_i64 i = begin + q / n, col = q % n;
                v[k] = p[kv_piece(src[i], per_page, page, step) + col];
                at[k] = kv_piece(dst[i], per_page, page, step) + col;
            }
        }
        __syncthreads();  // every read of the chunk before any write
        for (int k = 0; k < KV_CHUNK; ++k)
            if (at[k] >= 0) p[at[k]] = v[k];
        __syncthreads();  // the chunk's writes before the next chunk's reads
    }
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
    // grid (1, num_tensors): the whole CTA returns together, so the barriers are uniform
    int t = (int)blockIdx.y;
    if (t >= num_tensors || blockIdx.x != 0) return;
    kv_i64 n = geom[4 * t], page = geom[4 * t + 1], step = geom[4 * t + 2];
    kv_i64 per_page = geom[4 * t + 3];
    int g = group[t];
    kv_i64 begin = indptr[g], end = indptr[g + 1];
    char* base = (char*)ptrs[t];
    switch (unit[t]) {
    case 16: kv_move<kv_u128>(base, src, dst, begin, end, n, per_page, page, step); break;
    case 8: kv_move<unsigned long long>(base, src, dst, begin, end, n, per_page, page, step); break;
    case 4: kv_move<unsigned int>(base, src, dst, begin, end, n, per_page, page, step); break;
    case 2: kv_move<unsigned short>(base, src, dst, begin, end, n, per_page, page, step); break;
    default: kv_move<unsigned char>(base, src, dst, begin, end, n, per_page, page, step); break;
    }
}
