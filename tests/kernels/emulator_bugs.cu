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
