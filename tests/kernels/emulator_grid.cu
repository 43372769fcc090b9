// Cooperative launches and grid-wide synchronization (tests/test_emulator_grid.py): a working
// two-phase grid reduction, and the misuses the emulator must report.
//
// @dtypes none

#include <cooperative_groups.h>

namespace cg = cooperative_groups;

// Phase 1: each block sums its slice of x into partials[block] and keeps, per thread, its x in
// dynamic shared memory and the block's id and sum in static shared memory. grid.sync(). Phase 2:
// every block sums all partials in block order (the same bits in every block) and writes, per
// thread, y = x (read back from its own block's shared memory) * total; block_out gets what the
// block's static shared memory still holds: (block id, partial) and the total. Blocks interleave
// at the grid barrier, so any leak of one block's shared memory into another's shows.
extern "C" __global__ void grid_scale_by_sum(float* y, float* block_out, float* partials,
                                             const float* __restrict__ x) {
    extern __shared__ float keep[];
    __shared__ float warp_sums[32];
    __shared__ float block_id_and_sum[2];
    cg::grid_group grid = cg::this_grid();
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const long long i = (long long)blockIdx.x * nthreads + tid;
    keep[tid] = x[i];
    float s = block_reduce_sum(x[i], warp_sums);
    if (tid == 0) {
        partials[blockIdx.x] = s;
        block_id_and_sum[0] = (float)blockIdx.x;
        block_id_and_sum[1] = s;
    }
    grid.sync();
    float total = 0.f;
    for (unsigned int b = 0; b < gridDim.x; ++b) total += partials[b];
    y[i] = keep[tid] * total;
    if (tid == 0) {
        block_out[3 * blockIdx.x] = block_id_and_sum[0];
        block_out[3 * blockIdx.x + 1] = block_id_and_sum[1];
        block_out[3 * blockIdx.x + 2] = total;
    }
}

// Several grid barriers in a row: a token passes around the ring of blocks, one hop per round;
// ring[b] ends as the number of rounds plus b's start value shifted by `rounds` places.
extern "C" __global__ void grid_ring(int* ring, int* scratch, int rounds) {
    cg::grid_group grid = cg::this_grid();
    const unsigned int nb = gridDim.x, b = blockIdx.x;
    for (int r = 0; r < rounds; ++r) {
        int v = 0;
        if (threadIdx.x == 0) v = ring[(b + nb - 1) % nb] + 1;
        grid.sync();
        if (threadIdx.x == 0) scratch[b] = v;
        grid.sync();
        if (threadIdx.x == 0) ring[b] = scratch[b];
        grid.sync();
    }
}

// Planted: block 1 returns before the grid barrier the others wait at (a hang on the GPU).
extern "C" __global__ void grid_sync_skipped_by_block(int* y) {
    if (blockIdx.x == 1) return;
    cg::this_grid().sync();
    y[blockIdx.x] = 1;
}

// Planted: one thread of every block returns early; grid.sync needs every thread of the grid.
extern "C" __global__ void grid_sync_after_thread_exit(int* y) {
    if (threadIdx.x == 5) return;
    cg::this_grid().sync();
    y[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Planted: the first warp of block 0 waits at __syncthreads while everyone else is at grid.sync.
extern "C" __global__ void grid_sync_divergent(int* y) {
    if (blockIdx.x == 0 && threadIdx.x < 32)
        __syncthreads();
    else
        cg::this_grid().sync();
    y[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Planted: block 0 waits at one grid.sync, the other blocks at another.
extern "C" __global__ void grid_sync_two_call_sites(int* y) {
    cg::grid_group grid = cg::this_grid();
    if (blockIdx.x == 0)
        grid.sync();
    else
        grid.sync();
    y[blockIdx.x] = 1;
}
