// CPU emulation for kernels that cooperate inside a CTA (compaction, decode attention): every
// thread of a block is a std::thread, __syncthreads is a block barrier, __shared__ variables are
// function statics (one block runs at a time), and a warp shuffle exchanges values through a
// per-warp buffer between two warp barriers. Slow, but exact in its indexing: it exists to
// check the kernel's addressing and reductions against the torch reference without a GPU.
// Requires warp-uniform control flow around shuffles (the kernels guarantee it).
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct kv_dim3 { unsigned int x, y, z; };
static thread_local kv_dim3 threadIdx;
static kv_dim3 blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __launch_bounds__(n)

struct kv_emu_barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned count = 0, total = 0, gen = 0;
    void wait() {
        std::unique_lock<std::mutex> lk(m);
        unsigned g = gen;
        if (++count == total) {
            count = 0;
            ++gen;
            cv.notify_all();
        } else {
            cv.wait(lk, [&] { return gen != g; });
        }
    }
};

static kv_emu_barrier kv_block_barrier;
static std::vector<kv_emu_barrier>* kv_warp_barriers;
static float kv_warp_buf[32][32];

static inline void __syncthreads() { kv_block_barrier.wait(); }

static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
#define __expf(x) std::exp((float)(x))  // glibc declares its own __expf; shadow it

static inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    kv_emu_barrier& b = (*kv_warp_barriers)[warp];
    kv_warp_buf[warp][lane] = v;
    b.wait();
    float r = kv_warp_buf[warp][lane ^ (unsigned)o];
    b.wait();
    return r;
}

// Blocks one after another; the threads of a block concurrently (blockDim.x <= 1024, 1-d).
#define KV_EMU_LAUNCH(kernel, gx, gy, gz, bx, by, bz, ...)                                  \
    do {                                                                                   \
        gridDim = kv_dim3{(unsigned)(gx), (unsigned)(gy), (unsigned)(gz)};                 \
        blockDim = kv_dim3{(unsigned)(bx), 1u, 1u};                                        \
        std::vector<kv_emu_barrier> warps((blockDim.x + 31) / 32);                         \
        for (auto& w : warps) w.total = 32;                                                \
        kv_warp_barriers = &warps;                                                         \
        kv_block_barrier.total = blockDim.x;                                               \
        for (blockIdx.z = 0; blockIdx.z < gridDim.z; ++blockIdx.z)                         \
            for (blockIdx.y = 0; blockIdx.y < gridDim.y; ++blockIdx.y)                     \
                for (blockIdx.x = 0; blockIdx.x < gridDim.x; ++blockIdx.x) {               \
                    std::vector<std::thread> ts;                                           \
                    for (unsigned t = 0; t < blockDim.x; ++t)                              \
                        ts.emplace_back([&, t] {                                           \
                            threadIdx = kv_dim3{t, 0u, 0u};                                \
                            kernel(__VA_ARGS__);                                           \
                        });                                                                \
                    for (auto& th : ts) th.join();                                         \
                }                                                                          \
    } while (0)
