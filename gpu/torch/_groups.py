"""A torch.distributed process group as the ops take it: checked, and by name (a custom op takes
no Python objects), then back to the `gpu.distributed` communicator inside the op."""
from __future__ import annotations

from typing import Any

from .. import distributed as D


def group_name(process_group: Any) -> str:
    """The name of `process_group`, a torch.distributed ProcessGroup (``dist.group.WORLD``, or one
    from ``dist.new_group``); RuntimeError when torch.distributed is not initialized, TypeError
    for anything else."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    name = getattr(process_group, "group_name", None)
    if not isinstance(name, str):
        raise TypeError("process_group: expected a torch.distributed ProcessGroup (e.g. dist.group.WORLD), "
                        f"got {type(process_group).__name__}")
    return name


def communicator(name: str) -> D.Communicator:
    """The gpu.distributed adapter of the named group: the same adapter every call (its header
    check runs once per configuration)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return D.wrap(_resolve_process_group(name))
