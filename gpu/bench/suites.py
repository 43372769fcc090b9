"""What a run measures by default: the suites of shapes by device, the dtypes, and the CPU
speed check's cases and targets (`--cpu-check`)."""
from __future__ import annotations

# Default suites by family: (shape, batch-norm layout). Realistic sizes: dense layers from a small
# batch to a large one, CNN activations early (large H, W) and late (many channels), classifier
# heads from ImageNet to a 128k-token vocabulary.
SUITES = {
    "gpu": {
        "batch_norm": [((256, 1024), "nc"), ((8192, 1024), "nc"), ((262144, 256), "nc"),
                       ((32, 64, 112, 112), "nchw"), ((256, 256, 14, 14), "nchw"), ((64, 2048, 7, 7), "nchw"),
                       ((32, 112, 112, 64), "nhwc"), ((256, 14, 14, 256), "nhwc"), ((64, 7, 7, 2048), "nhwc")],
        "softmax": [((4096, 1000), ""), ((8192, 32000), ""), ((4096, 128256), "")],
    },
    "cpu": {
        "batch_norm": [((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw"), ((32, 56, 56, 64), "nhwc")],
        "softmax": [((4096, 1000), ""), ((1024, 32000), "")],
    },
    "quick": {
        "batch_norm": [((256, 64), "nc"), ((8, 16, 8, 8), "nchw"), ((8, 8, 8, 16), "nhwc")],
        "softmax": [((256, 1000), "")],
    },
    # `--headline`: the shapes of the headline, for a short GPU run (scripts/gpu_check.sh): a dense
    # layer and an early CNN activation; an ImageNet head and an LLM vocabulary
    "headline": {
        "batch_norm": [((4096, 1024), "nc"), ((32, 64, 56, 56), "nchw")],
        "softmax": [((4096, 1000), ""), ((8192, 32000), "")],
    },
}
DEFAULT_DTYPES = {"gpu": ("float32", "float16"), "cpu": ("float32",)}

#: The NumPy path's speed targets (float32, median of 10, PyTorch on 2 threads): at least 2x the
#: seed's direct formulas, and against PyTorch CPU within 1.2x for BN forward+backward and at or
#: better for softmax-CE forward+backward (`max_slowdown_vs_torch`, per case).
CPU_CHECK = {"cases": [("batch_norm_train", (4096, 1024), "nc"), ("softmax_cross_entropy_train", (4096, 1000), "")],
             "min_speedup_vs_seed": 2.0,
             "max_slowdown_vs_torch": {"batch_norm_train": 1.2, "softmax_cross_entropy_train": 1.0},
             "repeat": 10, "threads": 2}
