"""PyTorch interop: drop-in batch norm and cross-entropy for torch models (needs the `torch` extra).

    import gpu.torch as gt
    y = gt.batch_norm(x, running_mean, running_var, weight, bias, training=True)   # F.batch_norm
    loss = gt.cross_entropy(logits, target)                                      # F.cross_entropy
    model = gt.convert(model)       # every torch.nn.BatchNorm*d -> gpu.torch.BatchNorm*d
    y = gt.batch_norm(x, rm, rv, w, b, training=True, residual=r, activation="relu")  # relu(bn(x) + r)
    model = gt.fuse(model)          # each BN -> ReLU and BN -> add -> ReLU: one fused call (torch.fx)
    model = gt.SyncBatchNorm.convert_sync_batchnorm(model)    # synchronized over torch.distributed
    criterion = gt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    loss = gt.fused_linear_cross_entropy(h, lm_head.weight, next_tokens)    # logits never held
    loss = gt.fused_linear_cross_entropy(h, my_rows_of_W, next_tokens, process_group=group)  # vocab-parallel

CPU tensors run the NumPy path and CUDA tensors the CUDA kernels, with no copy either way (see
`gpu.torch._bridge`). The functions are `torch.library.custom_op`s (``torch.ops.gpu.*``) with
autograd and fake implementations: gradcheck and ``torch.compile(fullgraph=True)`` work.
``import gpu`` does not import torch; ``import gpu.torch`` does.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("gpu.torch needs PyTorch: pip install 'gpu[torch]' (see README.md, PyTorch)") from e

from .act_modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, SyncBatchNormAct
from .batch_norm_act import batch_norm, sync_batch_norm
from .functional import cross_entropy
from .fuse import fuse
from .linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, CrossEntropyLoss, convert
from .sync_batchnorm import SyncBatchNorm
from . import vocab_parallel as _vocab_parallel  # noqa: F401  (registers gpu::vocab_parallel_cross_entropy_fwd)

__all__ = ["batch_norm", "cross_entropy", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "CrossEntropyLoss",
           "convert", "fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss", "SyncBatchNorm",
           "sync_batch_norm", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNormAct", "fuse"]
