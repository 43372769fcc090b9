// common.cuh: device helpers shared by every kernel family in cuda_src/.
//
// gpu/_kernels.py pastes this text in front of each cuda_src/<family>.cu (it is never found through
// -I): CuPy's disk cache hashes only the source string, so an edit here must change that string.
// The same text is compiled by CuPy (NVRTC), by the NVRTC compile check and by the CPU emulator.
//
// Macros set by the loader when a kernel is requested with a dtype (see gpu/_kernels.py):
//   SCALAR_T   storage type: __half, __nv_bfloat16, float or double
//   ACC_T      accumulation type: double for double, float for everything else
//   exactly one of SCALAR_IS_HALF, SCALAR_IS_BF16, SCALAR_IS_FLOAT, SCALAR_IS_DOUBLE
//
// Shared basics only: the index type and ceil_div; scalar_t / acc_t; conversions to_acc /
// from_acc; warp and block reductions; 128-bit vector loads and stores; the last-block ticket that
// ends a deterministic grid reduction. What one engine alone needs lives in its own header, which
// a family declares with `// @headers` (pasted after this one, in the order given):
//   rows.cuh      row reductions (softmax, log-softmax, hardmax, cross-entropy)
//   channels.cuh  per-channel reductions over (outer, inner) (batch norm)
//
// Reductions run in a fixed order (butterfly within a warp, then warp partials in warp order), so
// a launch with the same shape gives bitwise the same result every time.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---------------------------------------------------------------------------------------------
// Indexing
// ---------------------------------------------------------------------------------------------

// Every size that can exceed 2^31 elements is an index_t: signed, so `i < n` loops and
// differences behave, and 64 bits wide.
typedef long long index_t;

// NVRTC has no <math.h>: INFINITY and NAN from their bit patterns (as CUDA's math_constants.h).
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

#define GPU_WARP 32             // warpSize as a constant expression (loop bounds, array sizes)
#define GPU_FULL_MASK 0xffffffffu   // every lane of the warp takes part in a shuffle

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Linear thread index within the block and the block's size, for any block shape.
__device__ __forceinline__ int block_thread_rank() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ int block_num_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// 2^x as one MUFU.EX2: ex2.approx.ftz.f32 (about 2 ulp, as exp2f; subnormal inputs and results
// flushed to 0, where exp2f spends 3 more instructions keeping subnormal results). The emulator
// defines it in its cuda_emulator.h (no inline PTX there).
#if !defined(GPU_EMULATOR)
__device__ __forceinline__ float ex2_approx_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// ---------------------------------------------------------------------------------------------
// Storage and accumulation types, and conversions between them
// ---------------------------------------------------------------------------------------------

// Families built without a dtype (test kernels declared `// @dtypes none`) have neither.
#if defined(SCALAR_T)
typedef SCALAR_T scalar_t;
typedef ACC_T acc_t;
#endif

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

// from_acc<SCALAR_T>(acc): round to nearest even, as NumPy's astype does.
template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// ---------------------------------------------------------------------------------------------
// Warp and block reductions
// ---------------------------------------------------------------------------------------------

// An Op is a symmetric binary operator with a static identity<T>(): what the lanes past the
// block's last warp contribute in block_reduce.
struct SumOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
    template <typename T> __device__ __forceinline__ static T identity() { return T(0); }
};

// All 32 lanes of the warp must call this (full mask). The result is in every lane.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int offset = GPU_WARP / 2; offset > 0; offset >>= 1)
        v = op(v, __shfl_xor_sync(GPU_FULL_MASK, v, offset));
    return v;
}

// Reduce over the whole block; the result is returned to every thread.
// `scratch` is a __shared__ array of at least 32 elements. The block size must be a multiple of
// 32 and every thread must call. Ends with a barrier, so `scratch` may be reused at once.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
    const int tid = block_thread_rank();
    const int lane = tid % GPU_WARP;
    const int warp = tid / GPU_WARP;
    const int num_warps = block_num_threads() / GPU_WARP;
    v = warp_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    // Every warp reduces the per-warp partials itself: no broadcast round trip through memory.
    v = lane < num_warps ? scratch[lane] : Op::template identity<T>();
    v = warp_reduce(v, op);
    __syncthreads();
    return v;
}
template <typename T> __device__ __forceinline__ T block_reduce_sum(T v, T* scratch) {
    return block_reduce(v, scratch, SumOp());
}

// ---------------------------------------------------------------------------------------------
// The last-block ticket: how a grid reduction ends in one launch, in a fixed order
// ---------------------------------------------------------------------------------------------

// Call once this block's partial is stored (by any of its threads); every thread of the block
// calls. True, in every thread, in the one block that takes the last of `blocks` tickets from
// `counter` (zero before the launch): every other block's partial is visible to it then, so it
// merges them in an order of its choosing (block or partition order), never in the order the
// blocks finished. Read the partials through volatile or L2 (__ldcg) loads: L1 is not coherent.
// No floating-point atomics, so the result is bitwise reproducible.
// The last block sets the counter back to zero: every ticket is taken by then, so no block of this
// launch touches it again, and the next launch on the stream finds it zero. Counters live in a
// persistent workspace (gpu/_workspace.py), zeroed once when allocated, never per launch.
__device__ __forceinline__ bool last_block_ticket(unsigned int* counter, unsigned int blocks) {
    __shared__ int is_last;
    __threadfence();   // this block's partial visible device-wide before its ticket is taken
    __syncthreads();
    if (block_thread_rank() == 0) {
        is_last = atomicAdd(counter, 1u) == blocks - 1;
        if (is_last) *counter = 0u;
    }
    __syncthreads();
    if (!is_last) return false;   // block-uniform
    __threadfence();   // the other blocks' partials are read after their tickets
    return true;
}

// ---------------------------------------------------------------------------------------------
// 128-bit vector loads and stores
// ---------------------------------------------------------------------------------------------

// Pack<T>: the elements of one 16-byte transaction (8 halves or bfloat16s, 4 floats, 2 doubles).
// The pointer must be 16-byte aligned (callers run a scalar head/tail for the rest, or take a
// scalar path): a misaligned vector access faults on the GPU and in the emulator alike.
template <typename T>
struct alignas(16) Pack {
    static constexpr int size = 16 / sizeof(T);
    T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* __restrict__ p) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    Pack<T> out;
    memcpy(&out, &raw, sizeof(out));
    return out;
}

// Streaming load: data read once, keep it out of L1/L2 for the data that is re-read.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack_stream(const T* p) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    Pack<T> out;
    memcpy(&out, &raw, sizeof(out));
    return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
    uint4 raw;
    memcpy(&raw, &x, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
}

// Streaming store: the output is not re-read by this kernel.
template <typename T>
__device__ __forceinline__ void store_pack_stream(T* p, const Pack<T>& x) {
    uint4 raw;
    memcpy(&raw, &x, sizeof(raw));
    __stcs(reinterpret_cast<uint4*>(p), raw);
}
