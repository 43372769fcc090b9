// Kernels with planted memory-traffic bugs, one per kind the trace build must catch
// (tests/test_traffic.py), next to the correct kernel each one spoils. All of them compute the
// right answer: only the addresses they touch are wrong, which no numerical test can see.
//
// @dtypes none

// The reference: y = 2 x, one coalesced 4-byte load and store per thread (4 sectors a warp request).
extern "C" __global__ void scale_coalesced(float* y, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.f * x[i];
}

// Strided load: x holds the values at even positions (2n floats), each lane loads x[2i], so a
// warp request spans 256 bytes: 8 sectors where 4 hold the bytes it uses.
extern "C" __global__ void scale_strided(float* y, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.f * x[2 * i];
}

// Input read twice: x loaded, then loaded again after a barrier (as a kernel that forgets it kept
// the row on chip): 3 E*s where 2 suffice.
extern "C" __global__ void scale_read_twice(float* y, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float a = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) y[i] = a + x[i];
}

// The same through shared memory, conflict-free: lane t stores and loads word t.
extern "C" __global__ void scale_shared(float* y, const float* __restrict__ x, int n) {
    __shared__ float s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) y[i] = 2.f * s[threadIdx.x];
}

// 2-way bank conflict: lane t stores word 2t (and the block's second half word 2t + 1), so lanes
// t and t + 16 of a warp hit the same bank at different words.
extern "C" __global__ void scale_bank_conflict(float* y, const float* __restrict__ x, int n) {
    __shared__ float s[512];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int w = 2 * (int)threadIdx.x;
    s[w] = i < n ? x[i] : 0.f;
    __syncthreads();
    if (i < n) y[i] = 2.f * s[w];
}

// Not bugs: the model's free cases. A broadcast (every lane loads x[0]: one 4-byte request, one
// sector) beside the coalesced load, and 16-byte shared accesses at a 16-byte lane stride
// (quarter-warp phases of 8 lanes x 16 bytes: conflict-free).
extern "C" __global__ void scale_broadcast_vec4(float* y, const float* __restrict__ x, int n) {
    __shared__ float4 s[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < n ? x[i] * x[0] : 0.f;
    s[threadIdx.x] = make_float4(v, v, v, v);
    __syncthreads();
    const float4 q = s[threadIdx.x];
    if (i < n) y[i] = q.x + q.w;
}
