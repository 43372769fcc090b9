"""gpu: batch-norm and softmax/cross-entropy kernels behind a NumPy-style API.

NumPy arrays run the NumPy reference path (the CPU fallback); CuPy arrays run hand-written CUDA
kernels. See README.md for the API table and `gpu.info()` for what this machine can run.
"""
from ._backend import use_backend
from ._info import __version__, info
from ._kernels import warmup
from ._workspace import check_errors, set_eager_checks
from .ops.batch_norm import (batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_inference,
                        batch_stats)
from .ops.linear_cross_entropy import fused_linear_cross_entropy
from .ops.softmax import (hardmax, log_softmax, softmax, softmax_cross_entropy,
                      softmax_cross_entropy_backward)

__all__ = [
    "__version__", "info", "use_backend", "warmup", "check_errors", "set_eager_checks",
    "batch_stats", "batch_norm_forward", "batch_norm_backward", "batch_norm_inference", "batch_norm",
    "softmax", "log_softmax", "hardmax", "softmax_cross_entropy", "softmax_cross_entropy_backward",
    "fused_linear_cross_entropy",
]
