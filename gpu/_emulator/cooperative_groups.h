// cooperative_groups.h for the gpu CPU emulator: the grid group, for kernels launched
// cooperatively (gpu._kernels.launch(..., cooperative=True)). Only what the project's kernels use
// is declared; anything else from CUDA's header (thread-block tiles, cluster groups, reductions)
// fails to compile.
//
// grid.sync() is a barrier over every thread of every block (runtime.cpp); a thread that has
// exited, a block waiting at another barrier, or a launch that is not cooperative is an error
// naming the kernel and the source line.
#pragma once

namespace cooperative_groups {

class grid_group {
  public:
    void sync(const char* f = __builtin_FILE(), int l = __builtin_LINE()) const {
        gpuemu::barrier(gpuemu::BAR_GRID, 0, f, l);
    }
    unsigned long long num_blocks() const { return (unsigned long long)gridDim.x * gridDim.y * gridDim.z; }
    unsigned long long block_rank() const {
        return blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
    }
    unsigned long long num_threads() const {
        return num_blocks() * blockDim.x * blockDim.y * blockDim.z;
    }
    unsigned long long thread_rank() const {
        return block_rank() * blockDim.x * blockDim.y * blockDim.z + threadIdx.x +
               blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    }
};

inline grid_group this_grid() { return grid_group(); }

inline void sync(const grid_group& g, const char* f = __builtin_FILE(), int l = __builtin_LINE()) { g.sync(f, l); }

}  // namespace cooperative_groups
