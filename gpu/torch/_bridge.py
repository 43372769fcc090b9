"""Tensor <-> array conversion, layouts and device handling between torch and the package's ops.

- CPU tensors become NumPy arrays sharing their storage (``Tensor.numpy()``; bfloat16 through an
  int16 view reinterpreted as ``ml_dtypes.bfloat16``) and run the NumPy path (or the emulator under
  ``gpu.use_backend("emulate")``); results come back through ``torch.from_numpy``: no copy either way.
- CUDA tensors become CuPy arrays through DLPack (no copy) and run the CUDA kernels on torch's
  current stream, with every allocation the ops make (outputs, workspaces) served by torch's caching
  allocator; results come back through DLPack. Nothing synchronizes the stream or the device.
- Any other device is refused with a RuntimeError naming it.

Layouts: the kernels' channels-last path takes (N, H, W, C) with the features on the last axis. A
``channels_last`` (or ``channels_last_3d``) tensor is that array seen through a permutation, so it
is passed as its (N, H, W, C) permuted view (contiguous: no copy) with the matching reduction axes,
and the result is permuted back: it keeps the input's memory format, as torch's own ops do.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from .._backend import BFLOAT16

_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Devices and argument checks shared by the ops
# ---------------------------------------------------------------------------------------------

def check_tensor(t: object, name: str, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_devices(**tensors: torch.Tensor | None) -> torch.device:
    """The common device of the named tensors (None entries skipped); RuntimeError naming the
    tensors when they are on different devices, or naming the device when it has no path here."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    dev = first.device
    for name, t in named[1:]:
        if t.device != dev:
            raise RuntimeError(f"{name}: expected a tensor on {first_name}'s device {dev}, got one on {t.device}")
    if dev.type not in _DEVICES and dev.type != "meta":
        raise RuntimeError(f"{first_name}: tensors on device '{dev}' are not supported by gpu.torch "
                           "(CPU tensors run the NumPy path, CUDA tensors the CUDA kernels)")
    return dev


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the package's ops: float64 for float64, float32 below."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

_TO_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_FROM_LAST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
_LAST_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(t: torch.Tensor) -> bool:
    """Whether `t` (N, C, ...) is stored channels-last (and not also plainly contiguous, as it is
    when C or the spatial size is 1)."""
    fmt = _LAST_FORMAT.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    return _LAST_FORMAT[t.dim()] if channels_last(t) else torch.contiguous_format


def dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous or channels-last, else a contiguous copy (odd strides only)."""
    return t if t.is_contiguous() or channels_last(t) else t.contiguous()


def features_last(t: torch.Tensor, last: bool) -> torch.Tensor:
    """(N, C, *spatial) as the (N, *spatial, C) view when `last` (a permutation, no copy)."""
    return t.permute(_TO_LAST[t.dim()]) if last else t


def features_first(t: torch.Tensor, last: bool) -> torch.Tensor:
    """The inverse of `features_last`."""
    return t.permute(_FROM_LAST[t.dim()]) if last else t


def bn_axis(ndim: int, last: bool) -> tuple[int, ...]:
    """The axes batch norm reduces over: all but C, which is axis 1, or the last axis when `last`."""
    return tuple(range(ndim - 1)) if last else (0,) + tuple(range(2, ndim))


def like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`out` with `ref`'s strides (what the fake implementations promise): itself when they already
    match, else copied into an empty_like(ref)."""
    if out.stride() == ref.stride() or out.numel() <= 1:
        return out
    fixed = torch.empty_like(ref, dtype=out.dtype)
    fixed.copy_(out)
    return fixed


# ---------------------------------------------------------------------------------------------
# Tensor <-> array
# ---------------------------------------------------------------------------------------------

def to_array(t: torch.Tensor | None):
    """A NumPy (CPU) or CuPy (CUDA) array sharing `t`'s storage; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            if BFLOAT16 is None:
                raise TypeError("bfloat16 tensors need ml_dtypes (pip install 'gpu[bf16]')")
            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()
    if t.device.type == "cuda":
        import cupy
        if t.dtype == torch.bfloat16:
            if BFLOAT16 is None:
                raise TypeError("bfloat16 tensors need ml_dtypes (pip install 'gpu[bf16]')")
            return cupy.from_dlpack(t.view(torch.int16)).view(BFLOAT16)
        return cupy.from_dlpack(t)
    raise RuntimeError(f"tensors on device '{t.device}' are not supported by gpu.torch")


def from_array(a) -> torch.Tensor:
    """The tensor sharing the storage of a result array (NumPy or CuPy)."""
    if isinstance(a, np.ndarray):
        if BFLOAT16 is not None and a.dtype == BFLOAT16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


# ---------------------------------------------------------------------------------------------
# Where the ops run
# ---------------------------------------------------------------------------------------------

class _TorchBlock:
    """Owner of a block from torch's caching allocator: returned to it when CuPy drops the memory."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __del__(self):
        torch.cuda.caching_allocator_delete(self.ptr)


def _torch_allocator(device_id: int, stream: int):
    import cupy

    def alloc(size: int):
        if size == 0:
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device_id), 0)
        ptr = torch.cuda.caching_allocator_alloc(size, device_id, stream)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device_id), 0)

    return alloc



@contextlib.contextmanager
def running_on(device: torch.device) -> Iterator[None]:
    """The context the package's ops run in for tensors on `device`: nothing for the CPU; for CUDA,
    that device, torch's current stream as CuPy's current stream and torch's caching allocator as
    CuPy's allocator."""
    if device.type != "cuda":
        yield
        return
    import cupy
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index), \
            cupy.cuda.using_allocator(_torch_allocator(index, stream.cuda_stream)):
        yield
