// CPU emulation of the few CUDA features kernels 2-4 use, so that g++ can compile them for
// the test suite. A launch is a plain loop over every (block, thread) index: kernels compiled
// this way must not use __syncthreads, shared memory or warp intrinsics (kernels 2-4 do not;
// compaction and decode attention do, and run under cuda_emu_threads.h).
#pragma once
#include <cmath>
#include <cstring>

struct kv_dim3 { unsigned int x, y, z; };
static kv_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__

static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
// Compile with -ffp-contract=off: a*b and a+b are then separate roundings, as on the GPU.
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline int atomicOr(int* p, int v) { int o = *p; *p = o | v; return o; }

// Run `kernel(args...)` over a grid, serially: blocks in order, threads in order.
#define KV_EMU_LAUNCH(kernel, gx, gy, gz, bx, by, bz, ...)                                   \
    do {                                                                                    \
        gridDim = kv_dim3{(unsigned)(gx), (unsigned)(gy), (unsigned)(gz)};                  \
        blockDim = kv_dim3{(unsigned)(bx), (unsigned)(by), (unsigned)(bz)};                 \
        for (blockIdx.z = 0; blockIdx.z < gridDim.z; ++blockIdx.z)                          \
            for (blockIdx.y = 0; blockIdx.y < gridDim.y; ++blockIdx.y)                      \
                for (blockIdx.x = 0; blockIdx.x < gridDim.x; ++blockIdx.x)                  \
                    for (threadIdx.z = 0; threadIdx.z < blockDim.z; ++threadIdx.z)          \
                        for (threadIdx.y = 0; threadIdx.y < blockDim.y; ++threadIdx.y)      \
                            for (threadIdx.x = 0; threadIdx.x < blockDim.x; ++threadIdx.x)  \
                                kernel(__VA_ARGS__);                                        \
    } while (0)
