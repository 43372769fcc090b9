"""Collectives for synchronized batch norm and data-parallel training, on existing engines.

One small interface, `Communicator`: rank, size, the engine's name, and two collectives over one
contiguous 1-D buffer (``allgather`` and ``allreduce`` with sum). Three implementations wrap the
engines; nothing here moves bytes itself:

- `MPICommunicator`: an mpi4py communicator. NumPy arrays go directly; CuPy arrays go directly
  when the MPI library is CUDA-aware, else they are staged through pinned host memory.
- `TorchCommunicator`: a torch.distributed process group (gloo on CPU, NCCL on GPU). Each
  collective runs on tensors of its own (a copy of the few KiB of statistics in and out), never on
  tensors that share the caller's array: gloo's threads release finished collectives' tensors
  whenever they like, the interpreter's exit included.
- `NCCLCommunicator`: cupyx.distributed's NCCL communicator, for CuPy arrays.

`wrap` turns any of those (or an adapter) into a `Communicator`; the batch-norm functions and
the trainer only see that interface. Importing this module imports no engine: mpi4py, torch
and cupyx are imported when a communicator of theirs is wrapped.

>>> from mpi4py import MPI                      # doctest: +SKIP
>>> import gpu, gpu.distributed
>>> comm = gpu.distributed.wrap(MPI.COMM_WORLD)  # doctest: +SKIP
>>> y, mean, invstd = gpu.batch_norm_forward(x, comm=comm)   # doctest: +SKIP
"""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

__all__ = ["Communicator", "CollectiveError", "MPICommunicator", "NCCLCommunicator",
           "TorchCommunicator", "wrap"]


class CollectiveError(RuntimeError):
    """A collective failed in the engine (a timeout, a dead peer): names the collective, the
    engine, this rank and the buffer."""


class Communicator:
    """The adapter interface: ``rank``, ``size``, ``engine`` and two collectives.

    ``allgather(buf, what)`` returns a new (size, n) array whose row r is rank r's buf;
    ``allreduce(buf, what)`` returns the elementwise sum over ranks of buf (n,). ``buf`` is a
    C-contiguous 1-D array (NumPy, or CuPy where the engine takes device memory); the result is of
    the same array module. ``what`` names the collective in errors. ``collectives`` counts the
    calls (tests and benchmarks read it); ``timeout`` (seconds, or None for the engine's own)
    bounds each call where the engine allows.
    """

    engine = "?"

    def __init__(self, rank: int, size: int, timeout: float | None = None) -> None:
        self.rank, self.size, self.timeout = int(rank), int(size), timeout
        self.collectives = 0
        #: channel counts whose agreement across ranks a header exchange has checked (batch norm)
        self.verified: set[Any] = set()
        #: device-side agreement flags not yet read on the host (batch norm's GPU path)
        self.pending: list[Any] = []
        #: collectives whose wait timed out, still in flight in the engine (with their buffers):
        #: they complete once the late peers join; `drain` waits for them
        self.abandoned: list[Any] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.engine} rank {self.rank} of {self.size}>"

    def defer_check(self, xp, ok, message: str) -> None:
        """Queue a device-side agreement flag `ok` (a 1-element boolean device array): copied to
        pinned host memory without waiting, and raised as `message` by a later `raise_pending`
        once it has arrived (the GPU path checks agreement with no host sync)."""
        import cupyx
        host = cupyx.empty_pinned((1,), np.bool_)
        ok.reshape(1).get(out=host, blocking=False)
        event = xp.cuda.Event()
        event.record()
        self.pending.append((host, event, message))

    def raise_pending(self, error: type = ValueError) -> None:
        """Raise `error` with the message of an earlier deferred check whose flag has reached the
        host false; checks still in flight stay queued."""
        keep = []
        for flag, event, message in self.pending:
            if not event.done:
                keep.append((flag, event, message))
            elif not bool(flag[0]):
                self.pending = []
                raise error(message)
        self.pending = keep

    def allgather(self, buf, what: str = "allgather"):
        out = _empty_like(buf, (self.size, buf.shape[0]))
        self._call(what, "allgather", buf, lambda: self._allgather(buf, out))
        return out

    def allreduce(self, buf, what: str = "allreduce"):
        out = _empty_like(buf, buf.shape)
        self._call(what, "allreduce", buf, lambda: self._allreduce(buf, out))
        return out

    # engines implement these two: out is preallocated, of the same array module as buf
    def _allgather(self, buf, out) -> None:
        raise NotImplementedError

    def _allreduce(self, buf, out) -> None:
        raise NotImplementedError

    def drain(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds; None: the engine's own bound) for the collectives
        abandoned by a timed-out wait, which complete once the late ranks join. True when none is
        left in flight. The next collective and the interpreter's exit call it, so no collective
        is still running in the engine when it or its process group is torn down."""
        while self.abandoned:
            if not self._finish(self.abandoned[0], timeout):
                return False
            self.abandoned.pop(0)
        return True

    def _finish(self, request, timeout: float | None) -> bool:
        """Wait for one abandoned collective; False if it is still in flight after ``timeout``."""
        raise NotImplementedError

    def _abandon(self, request) -> None:
        if not self.abandoned:
            _drain_at_exit(self)
        self.abandoned.append(request)

    def _call(self, what: str, op: str, buf, fn) -> None:
        self.collectives += 1
        try:
            if self.abandoned:
                # collectives complete in order: the abandoned ones first, so that their late
                # peers' results land before this one's are read
                self.drain(self.timeout)
            fn()
        except CollectiveError:
            raise
        except Exception as e:      # the engine's own exception types differ; the message names ours
            raise CollectiveError(
                f"{what}: {op} of {buf.shape[0]} {buf.dtype} values failed on {self.engine} rank "
                f"{self.rank} of {self.size}"
                + (f" (timeout {self.timeout:g} s)" if self.timeout is not None else "")
                + f": {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def _empty_like(buf, shape):
    if type(buf) is np.ndarray:
        return np.empty(shape, buf.dtype)
    import cupy
    return cupy.empty(shape, buf.dtype)


def _is_device(buf) -> bool:
    return type(buf) is not np.ndarray


# ---------------------------------------------------------------------------------------------
# mpi4py
# ---------------------------------------------------------------------------------------------

class MPICommunicator(Communicator):
    """An mpi4py intracommunicator. ``timeout``: the nonblocking collective is polled and a
    CollectiveError raised past the deadline (MPI cannot cancel a collective: the process should
    then exit, e.g. through ``comm.Abort()``)."""

    engine = "mpi"

    def __init__(self, comm, timeout: float | None = None) -> None:
        super().__init__(comm.Get_rank(), comm.Get_size(), timeout)
        self.comm = comm
        self._cuda_aware: bool | None = None

    def cuda_aware(self) -> bool:
        """Whether the MPI library takes device pointers (MPIX_Query_cuda_support)."""
        if self._cuda_aware is None:
            from mpi4py import MPI
            query = getattr(MPI, "Query_cuda_support", None)
            try:
                self._cuda_aware = bool(query()) if query is not None else False
            except Exception:
                self._cuda_aware = False
        return self._cuda_aware

    def _run(self, start) -> None:
        # always the nonblocking collective: MPI does not match a blocking collective on one rank
        # with a nonblocking one on another, and a timeout needs the nonblocking form
        req = start(blocking=False)
        if not self._finish(req, self.timeout):
            # MPI cannot cancel a collective: the request stays alive (with its buffers, the
            # caller's) so that late peers still complete it without writing freed memory
            self._abandon(req)
            raise TimeoutError(f"no completion after {self.timeout:g} s")

    def _finish(self, req, timeout: float | None) -> bool:
        if timeout is None:
            req.Wait()
            return True
        deadline = time.monotonic() + timeout
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-4)
        return True

    def _staged(self, buf, out, start) -> None:
        """start(send, recv, blocking) on host copies of device buffers, through pinned memory."""
        if not _is_device(buf) or self.cuda_aware():
            if _is_device(buf):
                import cupy
                cupy.cuda.get_current_stream().synchronize()   # MPI does not order with the stream
            self._run(lambda blocking: start(buf, out, blocking))
            return
        import cupyx
        hb, ho = cupyx.empty_pinned(buf.shape, buf.dtype), cupyx.empty_pinned(out.shape, out.dtype)
        buf.get(out=hb)                                        # synchronizes: staging needs the host
        self._run(lambda blocking: start(hb, ho, blocking))
        out.set(ho)

    def _allgather(self, buf, out) -> None:
        c = self.comm
        self._staged(buf, out, lambda s, r, blocking: c.Allgather(s, r) if blocking else c.Iallgather(s, r))

    def _allreduce(self, buf, out) -> None:
        from mpi4py import MPI
        c = self.comm
        self._staged(buf, out, lambda s, r, blocking: (c.Allreduce(s, r, op=MPI.SUM) if blocking
                                                       else c.Iallreduce(s, r, op=MPI.SUM)))


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------

class TorchCommunicator(Communicator):
    """A torch.distributed process group (None: the default group). Each collective runs on
    tensors that own their memory (the buffer copied in, the result copied out): a tensor that
    shares a NumPy or CuPy array's memory (``torch.from_numpy``, DLPack) holds a Python reference,
    and gloo's own threads may drop the last reference to a finished collective's tensors at any
    time, the interpreter's exit included, where taking the GIL to release it aborts the process
    (``terminate called without an active exception``). The buffers here are per-channel
    statistics: the copies are a few KiB."""

    engine = "torch"

    def __init__(self, group=None, timeout: float | None = None) -> None:
        import torch.distributed as dist
        if not dist.is_initialized():
            raise ValueError("comm: torch.distributed is not initialized (call "
                             "torch.distributed.init_process_group first)")
        super().__init__(dist.get_rank(group), dist.get_world_size(group), timeout)
        self.group = group
        self.engine = f"torch/{dist.get_backend(group)}"

    @staticmethod
    def _owned(a):
        """A tensor holding a copy of `a` in memory of its own (no reference to a Python object)."""
        import torch
        if isinstance(a, np.ndarray):
            return torch.from_numpy(np.asarray(a)).clone()
        return torch.from_dlpack(a).clone()

    @staticmethod
    def _copy_out(t, out) -> None:
        if isinstance(out, np.ndarray):
            out[...] = t.numpy().reshape(out.shape)
        else:
            import cupy
            out[...] = cupy.from_dlpack(t).reshape(out.shape)

    def _wait(self, work) -> None:
        if not self._finish(work, self.timeout):
            # the engine keeps running the collective (gloo cannot cancel one): keep the work and
            # its tensors until it completes, never drop it in flight (the caller's buffers are
            # not among them: a late completion writes only this collective's own tensors)
            self._abandon(work)
            raise TimeoutError(f"no completion after {self.timeout:g} s")

    def _finish(self, work, timeout: float | None) -> bool:
        if timeout is None:
            work.wait()
            return True
        import datetime
        try:
            # torch raises on a timed-out wait (older releases returned False)
            return bool(work.wait(timeout=datetime.timedelta(seconds=timeout)))
        except RuntimeError:
            if work.is_completed():        # completed with an error of its own: report that
                raise
            return False

    def _allgather(self, buf, out) -> None:
        import torch.distributed as dist
        # all_gather_single where torch has it (all_gather_into_tensor is deprecated there)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        import torch
        send = self._owned(buf)
        recv = torch.empty(out.size, dtype=send.dtype, device=send.device)
        self._wait(gather(recv, send, group=self.group, async_op=True))
        self._copy_out(recv, out)

    def _allreduce(self, buf, out) -> None:
        import torch.distributed as dist
        t = self._owned(buf)
        self._wait(dist.all_reduce(t, group=self.group, async_op=True))
        self._copy_out(t, out)


# ---------------------------------------------------------------------------------------------
# cupyx.distributed (NCCL)
# ---------------------------------------------------------------------------------------------

class NCCLCommunicator(Communicator):
    """cupyx.distributed's NCCL communicator (``cupyx.distributed.init_process_group``): CuPy
    arrays, on the current stream, no host synchronization. ``timeout`` is not supported by the
    engine (NCCL waits on the device)."""

    engine = "nccl"

    def __init__(self, comm, timeout: float | None = None) -> None:
        size = getattr(comm, "_n_devices", None)
        if size is None:
            raise TypeError("comm: a cupyx.distributed communicator without a device count")
        super().__init__(comm.rank, size, timeout)
        self.comm = comm

    def _allgather(self, buf, out) -> None:
        if not _is_device(buf):
            raise TypeError("comm: the NCCL communicator takes CuPy arrays, got a NumPy array")
        self.comm.all_gather(buf, out.reshape(-1), buf.shape[0])

    def _allreduce(self, buf, out) -> None:
        if not _is_device(buf):
            raise TypeError("comm: the NCCL communicator takes CuPy arrays, got a NumPy array")
        self.comm.all_reduce(buf, out, "sum")


# ---------------------------------------------------------------------------------------------
# abandoned collectives at exit
# ---------------------------------------------------------------------------------------------

_EXIT_DRAIN: list[Communicator] = []
#: seconds the exit waits for each communicator's abandoned collectives
EXIT_DRAIN_TIMEOUT = 60.0


def _drain_at_exit(comm: Communicator) -> None:
    """Register `comm` to be drained when the interpreter exits (atexit runs before the engine's
    objects are torn down): a process whose collective timed out must not exit, or destroy its
    process group, with that collective still running in the engine's threads."""
    if not _EXIT_DRAIN:
        import atexit
        atexit.register(_drain_all)
    if comm not in _EXIT_DRAIN:
        _EXIT_DRAIN.append(comm)


def _drain_all() -> None:
    for comm in _EXIT_DRAIN:
        try:
            if not comm.drain(EXIT_DRAIN_TIMEOUT):
                print(f"gpu.distributed: {comm!r}: {len(comm.abandoned)} timed-out collective(s) still "
                      f"in flight at exit after {EXIT_DRAIN_TIMEOUT:g} s", file=sys.stderr)
        except Exception as e:      # the engine is gone or failed: nothing left to wait for
            print(f"gpu.distributed: {comm!r}: at exit: {type(e).__name__}: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# wrap
# ---------------------------------------------------------------------------------------------

_WRAPPED: dict[int, tuple[Any, Communicator]] = {}


def wrap(comm, timeout: float | None = None) -> Communicator:
    """A `Communicator` for `comm`: an adapter (returned as is), an mpi4py intracommunicator, a
    torch.distributed ProcessGroup, the string ``"torch"`` (the default group), or a
    cupyx.distributed communicator. The same engine object gives the same adapter (its counters
    and checked channel counts persist). TypeError for anything else."""
    if isinstance(comm, Communicator):
        return comm
    hit = _WRAPPED.get(id(comm))
    if hit is not None and hit[0] is comm:
        return hit[1]
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        if not hasattr(comm, "Allgather"):
            raise TypeError(f"comm: expected an mpi4py intracommunicator, got {type(comm).__name__}")
        adapter: Communicator = MPICommunicator(comm, timeout)
    elif (isinstance(comm, str) and comm == "torch") or _is_torch_group(comm):
        adapter = TorchCommunicator(None if isinstance(comm, str) else comm, timeout)
    elif module.startswith("cupyx.distributed"):
        adapter = NCCLCommunicator(comm, timeout)
    else:
        raise TypeError("comm: expected a gpu.distributed.Communicator, an mpi4py communicator, a "
                        "torch.distributed ProcessGroup (or 'torch' for the default group) or a "
                        f"cupyx.distributed communicator, got {type(comm).__name__}")
    _WRAPPED[id(comm)] = (comm, adapter)
    return adapter


def _is_torch_group(comm) -> bool:
    torch = sys.modules.get("torch")        # a ProcessGroup exists only if torch is imported
    if torch is None or isinstance(comm, str):
        return False
    try:
        return isinstance(comm, torch.distributed.ProcessGroup)
    except AttributeError:
        return False
