// Test kernels for the CPU emulator (tests/test_emulator.py): together they use every feature the
// emulator supports. On a GPU the same kernels must give bitwise the emulator's results for the
// integer and fixed-order float ones (the gpu-marked test). Not part of the package.
//
// Launch shapes are the tests' choice; every kernel is grid-stride or one thread per element.
//
// @dtypes float16 bfloat16 float32 float64

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

// One partial sum per block (grid-stride, then common.cuh's block_reduce_sum): fixed order.
extern "C" __global__ void block_sum(float* partials, const float* __restrict__ x, index_t n) {
    __shared__ float scratch[32];
    float v = 0.f;
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += stride) v += x[i];
    v = block_reduce_sum(v, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = v;
}

// The whole sum in one launch: per-block partials in a workspace, and the last block to take a
// ticket (common.cuh's last_block_ticket) sums them in block order (fixed order, whatever order
// the blocks finish in). The counter is reset for the next launch.
extern "C" __global__ void grid_sum(double* out, double* partials, unsigned int* counter,
                                    const float* __restrict__ x, index_t n) {
    __shared__ double scratch[32];
    double v = 0.0;
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    for (index_t i = blockIdx.x * (index_t)blockDim.x + threadIdx.x; i < n; i += stride) v += x[i];
    v = block_reduce_sum(v, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = v;
    if (!last_block_ticket(counter, gridDim.x)) return;
    double s = 0.0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) s += __ldcg(partials + b);
    s = block_reduce_sum(s, scratch);
    if (threadIdx.x == 0) {
        *out = s;
        *counter = 0;
    }
}

// Welford statistics (count, mean, M2) with Chan's parallel merge, for row_moments (batch norm
// has its own, vectorized). Count is kept in T: with T = float it is
// exact up to 2^24 per partial, which bounds what one thread or block may accumulate before
// merging. Trivially constructible, so it may live in __shared__ memory.
template <typename T>
struct Welford {
    T count, mean, m2;

    __device__ __forceinline__ static Welford empty() { return Welford{T(0), T(0), T(0)}; }

    __device__ __forceinline__ void push(T x) {
        count += T(1);
        const T delta = x - mean;
        mean += delta / count;
        m2 += delta * (x - mean);
    }

    // Chan et al.: combine two partials; either may be empty.
    __device__ __forceinline__ void merge(const Welford& o) {
        const T n = count + o.count;
        if (n == T(0)) return;
        const T delta = o.mean - mean;
        const T ratio = o.count / n;
        mean += delta * ratio;
        m2 += o.m2 + delta * delta * count * ratio;
        count = n;
    }

    __device__ __forceinline__ T var_biased() const { return count > T(0) ? m2 / count : T(0); }
};

template <typename T>
__device__ __forceinline__ Welford<T> warp_reduce_welford(Welford<T> w) {
#pragma unroll
    for (int offset = GPU_WARP / 2; offset > 0; offset >>= 1) {
        Welford<T> o;
        o.count = __shfl_xor_sync(GPU_FULL_MASK, w.count, offset);
        o.mean = __shfl_xor_sync(GPU_FULL_MASK, w.mean, offset);
        o.m2 = __shfl_xor_sync(GPU_FULL_MASK, w.m2, offset);
        w.merge(o);
    }
    return w;
}

// Same contract as block_reduce: `scratch` holds at least 32 entries, every thread calls, the
// block size is a multiple of 32, the result is in every thread.
template <typename T>
__device__ __forceinline__ Welford<T> block_reduce_welford(Welford<T> w, Welford<T>* scratch) {
    const int tid = block_thread_rank();
    const int lane = tid % GPU_WARP;
    const int warp = tid / GPU_WARP;
    const int num_warps = block_num_threads() / GPU_WARP;
    w = warp_reduce_welford(w);
    if (lane == 0) scratch[warp] = w;
    __syncthreads();
    w = lane < num_warps ? scratch[lane] : Welford<T>::empty();
    w = warp_reduce_welford(w);
    __syncthreads();
    return w;
}

// Welford mean/variance of each row, one block per row.
extern "C" __global__ void row_moments(ACC_T* mean, ACC_T* var, const SCALAR_T* __restrict__ x, int cols) {
    __shared__ Welford<ACC_T> scratch[32];
    const SCALAR_T* row = x + (index_t)blockIdx.x * cols;
    Welford<ACC_T> w = Welford<ACC_T>::empty();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) w.push(to_acc(row[c]));
    w = block_reduce_welford(w, scratch);
    if (threadIdx.x == 0) {
        mean[blockIdx.x] = w.mean;
        var[blockIdx.x] = w.var_biased();
    }
}

// fmaxf/fmax return the other operand for a NaN, in any order: the result does not depend on
// which lane holds the NaN.
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
    __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
    template <typename T> __device__ __forceinline__ static T identity() { return -T(INFINITY); }
};
template <typename T> __device__ __forceinline__ T block_reduce_max(T v, T* scratch) {
    return block_reduce(v, scratch, MaxOp());
}

// Softmax of each row, one block per row: the shape of the project's softmax launches.
extern "C" __global__ void row_softmax(SCALAR_T* y, const SCALAR_T* __restrict__ x, int cols) {
    __shared__ ACC_T scratch[32];
    const SCALAR_T* row = x + (index_t)blockIdx.x * cols;
    ACC_T m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmax(m, to_acc(row[c]));
    m = block_reduce_max(m, scratch);
    ACC_T s = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += exp(to_acc(row[c]) - m);
    s = block_reduce_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        y[(index_t)blockIdx.x * cols + c] = from_acc<SCALAR_T>(exp(to_acc(row[c]) - m) / s);
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles, votes and barriers with results
// ---------------------------------------------------------------------------------------------

// Eight results per thread:
//   0 warp sum in lane 0 (__shfl_down_sync)     1 inclusive warp scan (__shfl_up_sync)
//   2 lane 3 of each 8-lane segment (__shfl_sync, width 8)
//   3 the neighbour's value (__shfl_xor_sync 1)  4 __ballot_sync(x > 0)
//   5 __all_sync(x > -1000)  6 __any_sync(x > 50)  7 __syncthreads_count/and/or packed
extern "C" __global__ void warp_ops(int* out, const int* __restrict__ x) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x % GPU_WARP;
    const int v = x[t];
    int sum = v;
    for (int offset = GPU_WARP / 2; offset > 0; offset >>= 1) sum += __shfl_down_sync(GPU_FULL_MASK, sum, offset);
    int scan = v;
    for (int offset = 1; offset < GPU_WARP; offset <<= 1) {
        const int up = __shfl_up_sync(GPU_FULL_MASK, scan, offset);
        if (lane >= offset) scan += up;
    }
    const int seg = __shfl_sync(GPU_FULL_MASK, v, 3, 8);
    const int neighbour = __shfl_xor_sync(GPU_FULL_MASK, v, 1);
    const unsigned ballot = __ballot_sync(GPU_FULL_MASK, v > 0);
    const int all = __all_sync(GPU_FULL_MASK, v > -1000);
    const int any = __any_sync(GPU_FULL_MASK, v > 50);
    __syncwarp();
    const int count = __syncthreads_count(v > 0);
    const int all_block = __syncthreads_and(v > -1000);
    const int any_block = __syncthreads_or(v > 90);
    int* o = out + 8 * t;
    o[0] = lane == 0 ? sum : 0;
    o[1] = scan;
    o[2] = seg;
    o[3] = neighbour;
    o[4] = (int)ballot;
    o[5] = all;
    o[6] = any;
    o[7] = count * 4 + all_block * 2 + any_block;
}

// ---------------------------------------------------------------------------------------------
// Shared memory, atomics, indices
// ---------------------------------------------------------------------------------------------

// Reverse each block's slice through dynamic shared memory (blockDim.x * sizeof(SCALAR_T) bytes).
extern "C" __global__ void reverse_block(SCALAR_T* y, const SCALAR_T* __restrict__ x) {
    extern __shared__ __align__(16) unsigned char smem[];
    SCALAR_T* s = reinterpret_cast<SCALAR_T*>(smem);
    const index_t base = blockIdx.x * (index_t)blockDim.x;
    s[threadIdx.x] = x[base + threadIdx.x];
    __syncthreads();
    y[base + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Every atomic the emulator supports; the final values do not depend on the order of threads.
extern "C" __global__ void atomics(int* i32, unsigned int* u32, unsigned long long* u64, float* f32, double* f64,
                                   const int* __restrict__ x, int n) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int v = x[t];
    atomicAdd(i32 + 0, v);
    atomicMax(i32 + 1, v);
    atomicMin(i32 + 2, v);
    int old = i32[3];
    for (;;) {  // an atomic add built from compare-and-swap
        const int assumed = old;
        old = atomicCAS(i32 + 3, assumed, assumed + v);
        if (old == assumed) break;
    }
    atomicExch(i32 + 4, 7);
    atomicSub(i32 + 5, v);
    atomicAdd(u32 + 0, (unsigned int)v & 0xffu);
    atomicMax(u32 + 1, (unsigned int)(v + 1000));
    atomicInc(u32 + 2, 15u);
    atomicOr(u32 + 3, 1u << (t % 32));
    atomicAnd(u32 + 4, ~(1u << (t % 16)));
    atomicXor(u32 + 5, (unsigned int)t);
    atomicAdd(u64, (unsigned long long)(v + 1000));
    atomicAdd(f32 + 0, 0.5f);
    atomicExch(f32 + 1, 2.5f);
    atomicAdd(f64, (double)v);
}

// Six coordinates per thread (threadIdx.xyz, blockIdx.xyz), at its linear position in the launch.
extern "C" __global__ void index3d(int* out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int* o = out + 6 * (block * (int)(blockDim.x * blockDim.y * blockDim.z) + thread);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
}

// ---------------------------------------------------------------------------------------------
// Types, conversions, vector loads, math
// ---------------------------------------------------------------------------------------------

// float -> half and bfloat16 (round to nearest even) and back.
extern "C" __global__ void convert(__half* h, __nv_bfloat16* b, float* back, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __half hv = __float2half_rn(x[i]);
    const __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
    h[i] = hv;
    b[i] = bv;
    back[2 * i] = __half2float(hv);
    back[2 * i + 1] = __bfloat162float(bv);
}

// half2 arithmetic on pairs.
extern "C" __global__ void half2_add(__half2* y, const __half2* __restrict__ a, const __half2* __restrict__ b, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __hadd2(a[i], b[i]);
}

// y = 2 * x with 16-byte vector loads and stores, and a scalar head (up to the first aligned
// element of x) and tail. x and y must have the same alignment.
extern "C" __global__ void scale2(SCALAR_T* y, const SCALAR_T* __restrict__ x, index_t n) {
    constexpr int V = Pack<SCALAR_T>::size;
    const index_t misalign = (index_t)((16 - (reinterpret_cast<unsigned long long>(x) & 15)) & 15);
    const index_t head = min(n, misalign / (index_t)sizeof(SCALAR_T));
    const index_t stride = (index_t)gridDim.x * blockDim.x;
    const index_t tid = blockIdx.x * (index_t)blockDim.x + threadIdx.x;
    for (index_t i = tid; i < head; i += stride) y[i] = from_acc<SCALAR_T>(2 * to_acc(x[i]));
    const index_t vectors = (n - head) / V;
    for (index_t v = tid; v < vectors; v += stride) {
        Pack<SCALAR_T> p = load_pack(x + head + v * V);
#pragma unroll
        for (int k = 0; k < V; ++k) p.v[k] = from_acc<SCALAR_T>(2 * to_acc(p.v[k]));
        store_pack(y + head + v * V, p);
    }
    for (index_t i = head + vectors * V + tid; i < n; i += stride) y[i] = from_acc<SCALAR_T>(2 * to_acc(x[i]));
}

// Twelve math functions and intrinsics per input.
extern "C" __global__ void math(float* y, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i], a = fabsf(v);
    float* o = y + 12 * i;
    o[0] = expf(v);
    o[1] = __expf(v);
    o[2] = exp2f(v);
    o[3] = logf(a);
    o[4] = __logf(a);
    o[5] = log1pf(a);
    o[6] = rsqrtf(a);
    o[7] = fmaxf(v, 0.5f);
    o[8] = __fdividef(v, 3.0f);
    o[9] = fmaf(v, v, 1.0f);
    o[10] = isnan(v) ? 1.0f : 0.0f;
    o[11] = v > 0.0f ? INFINITY : -INFINITY;
}
