"""The Python half of each CUDA engine: plans, grids, shared memory, test knobs."""
