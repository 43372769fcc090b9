// Kernels with planted bugs, one per kind the emulator must catch (tests/test_emulator.py).
// Each compiles cleanly for the GPU: these are the bugs a GPU run hides or makes flaky.
//
// @dtypes none

// Missing barrier: thread 0 sums what the other threads wrote to shared memory. In forward order
// it reads before they have written (poison: NaN); reverse order happens to hide the bug.
extern "C" __global__ void missing_sync_first(float* y, const float* __restrict__ x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    // planted: __syncthreads() missing
    if (threadIdx.x == 0) {
        float a = 0.f;
        for (unsigned int i = 0; i < blockDim.x; ++i) a += s[i];
        y[blockIdx.x] = a;
    }
}

// The mirror bug: the last thread sums, so forward order hides it and reverse order exposes it.
extern "C" __global__ void missing_sync_last(float* y, const float* __restrict__ x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    // planted: __syncthreads() missing
    if (threadIdx.x == blockDim.x - 1) {
        float a = 0.f;
        for (unsigned int i = 0; i < blockDim.x; ++i) a += s[i];
        y[blockIdx.x] = a;
    }
}

// The correct kernel, for contrast.
extern "C" __global__ void with_sync(float* y, const float* __restrict__ x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.f;
        for (unsigned int i = 0; i < blockDim.x; ++i) a += s[i];
        y[blockIdx.x] = a;
    }
}

// Divergent barrier: the first warp waits at one __syncthreads, the rest of the block at another.
extern "C" __global__ void divergent_barrier(float* y) {
    __shared__ float s[32];
    if (threadIdx.x < 32) {
        s[threadIdx.x] = 1.f;
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = s[threadIdx.x % 32];
}

// A full-mask shuffle in a partial warp: with 100 threads per block, lanes 4-31 of warp 3 do not
// exist.
extern "C" __global__ void shuffle_partial_warp(float* y, const float* __restrict__ x) {
    float v = x[threadIdx.x];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

// A full-mask shuffle after lane 5 of every warp has returned.
extern "C" __global__ void shuffle_after_exit(float* y, const float* __restrict__ x) {
    if (threadIdx.x % 32 == 5) return;
    float v = x[threadIdx.x];
    v += __shfl_down_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

// Off by one: the thread with i == n writes one element past the end of y.
extern "C" __global__ void out_of_bounds(float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.f;
}

// Writes one float past the dynamic shared memory it was given (blockDim.x floats).
extern "C" __global__ void dynamic_smem_overflow(float* y) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x + 1] = 1.f;
    __syncthreads();
    y[threadIdx.x] = dyn[threadIdx.x];
}

// __trap() in one thread.
extern "C" __global__ void trap_in_thread_3(int* y) {
    if (threadIdx.x == 3) __trap();
    y[threadIdx.x] = 1;
}

// ---- Bugs only the strict modes catch (tests/test_emulator_strict.py) ----

// Missing ticket: the block with the highest index adds up every block's partial, as if it always
// ran last. Blocks in index order hide the bug; in any other order it reads partials not yet
// written (the caller's NaN).
extern "C" __global__ void last_block_by_index(float* y, float* partials, const float* __restrict__ x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.f;
        for (unsigned int i = 0; i < blockDim.x; ++i) a += s[i];
        partials[blockIdx.x] = a;
        __threadfence();
        // planted: no atomic ticket deciding which block is last
        if (blockIdx.x == gridDim.x - 1) {
            float t = 0.f;
            for (unsigned int b = 0; b < gridDim.x; ++b) t += partials[b];
            y[0] = t;
        }
    }
}

// Declared for at most 128 threads per block (the compiler may use up to 255 registers per
// thread on that promise); a launch with more must fail.
extern "C" __global__ void __launch_bounds__(128) bounded_128(float* y) {
    y[blockIdx.x * blockDim.x + threadIdx.x] = 1.f;
}

// n floats of dynamic shared memory, written and read back reversed.
extern "C" __global__ void dynamic_smem_reverse(float* y, const float* __restrict__ x, int n) {
    extern __shared__ float dyn[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) dyn[i] = x[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = dyn[n - 1 - i];
}

// A float4 load from x + offset: misaligned unless offset is a multiple of 4 floats.
extern "C" __global__ void float4_load_at(float* y, const float* __restrict__ x, int offset) {
    const float4 v = reinterpret_cast<const float4*>(x + offset)[threadIdx.x];
    y[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// 96 values live at once: ptxas gives it about a hundred registers per thread, so an SM holds
// far fewer of its blocks than threads and shared memory alone would allow.
extern "C" __global__ void register_heavy(float* y, const float* __restrict__ x) {
    float v[96];
#pragma unroll
    for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + i * blockDim.x];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i] + v[(i * 7) % 96];
    y[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Not a bug, a probe: the order in which the threads of a block reach three points separated by
// barriers (order[phase * blockDim.x + k] = the k-th thread to arrive in that phase).
extern "C" __global__ void arrival_order(int* order, unsigned int* tickets) {
    for (int phase = 0; phase < 3; ++phase) {
        order[phase * blockDim.x + atomicAdd(&tickets[phase], 1u)] = (int)threadIdx.x;
        __syncthreads();
    }
}
