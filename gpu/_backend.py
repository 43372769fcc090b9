"""Which array library an input belongs to, which path runs it, and the shared argument checks.

Every public op calls `dispatch(...)` once: it returns the array module of the inputs and whether
the op runs the NumPy reference path or the kernel launch path. This is the one place where the
choice is made:

- NumPy arrays take the NumPy reference path (also the CPU fallback), unless the backend is
  "emulate" (``GPU_BACKEND=emulate`` in the environment, or ``with gpu.use_backend("emulate")``),
  which sends them through the kernel launch path onto the CPU kernel emulator.
- CuPy arrays take the kernel launch path (CUDA kernels from ``cuda_src/``).

CuPy is never imported here unless the caller already holds a CuPy array, so ``import gpu`` works
with no CuPy installed and with CuPy installed but no GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import operator
import os
import sys
import weakref
from typing import Iterator, Sequence

import numpy as np

try:  # bfloat16 is optional: NumPy has no native bfloat16.
    import ml_dtypes as _ml_dtypes

    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    _ml_dtypes = None
    BFLOAT16 = None

BACKENDS = ("auto", "numpy", "emulate")
_ENV = "GPU_BACKEND"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("gpu_backend", default=None)

#: The storage dtypes every op accepts. float16 and bfloat16 compute in float32.
FLOAT_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32),
                                 np.dtype(np.float64)) if d is not None)


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------

# os.environ's own bytes dict on POSIX: a lookup without encoding the key and decoding the value
# (1.8 us -> 0.1 us; the public ops read the environment on every call, so a change takes effect
# at once), os.environ where there is none.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, fast on the per-call path."""
    if _ENVIRON_BYTES is None:
        return os.environ.get(name, default)
    v = _ENVIRON_BYTES.get(name.encode())
    return default if v is None else os.fsdecode(v)


def current_backend() -> str:
    """The backend NumPy arrays take now: "numpy" (default) or "emulate"."""
    name = _override.get()
    if name is None:
        name = env(_ENV, "auto") or "auto"
        if name not in BACKENDS:
            raise ValueError(f"{_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return "numpy" if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run NumPy-array calls inside the block on the given backend.

    ``"numpy"`` is the reference path; ``"emulate"`` sends NumPy arrays through the kernel launch
    path onto the CPU kernel emulator (the same grids, workspaces and checks as on a GPU).
    CuPy arrays always run the CUDA kernels.

    >>> import numpy as np, gpu
    >>> with gpu.use_backend("numpy"):
    ...     y = gpu.softmax(np.ones((2, 3), np.float32))
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def is_cupy_array(a: object) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def array_module(**arrays: object):
    """The array module (numpy or cupy) of the named arrays; None entries are skipped.

    Raises TypeError naming the arguments when NumPy and CuPy arrays are mixed in one call, and
    naming the argument for a torch.Tensor (gpu.torch is its API). Objects that are neither NumPy
    nor CuPy arrays (lists, tuples, scalars, objects with ``__array__`` or the buffer protocol)
    count as NumPy: they are read with ``np.asarray``, by NumPy's rules.
    """
    tt = sys.modules.get("torch")
    if tt is not None:               # no torch imported: no tensor can exist
        for name, a in arrays.items():
            if isinstance(a, tt.Tensor):
                raise TypeError(f"{name}: got a torch.Tensor; the NumPy-style API takes NumPy or CuPy arrays "
                                "and returns them (a tensor would lose autograd): use gpu.torch "
                                "(gpu.torch.cross_entropy, batch_norm, ...) for tensors, or pass tensor.numpy()")
    cp = sys.modules.get("cupy")
    if cp is None:                   # no CuPy imported: no CuPy array can exist
        return np
    on_gpu = [name for name, a in arrays.items() if a is not None and isinstance(a, cp.ndarray)]
    if not on_gpu:
        return np
    on_cpu = [name for name, a in arrays.items()
              if a is not None and not is_cupy_array(a) and not np.isscalar(a)]
    if on_cpu:
        raise TypeError(f"{', '.join(on_gpu)} {'is a CuPy array' if len(on_gpu) == 1 else 'are CuPy arrays'}"
                        f" but {', '.join(on_cpu)} {'is' if len(on_cpu) == 1 else 'are'} not: "
                        "pass all arrays of one call on the same device")
    return sys.modules["cupy"]


def path_key(x) -> str | None:
    """Which path a call whose first array is ``x`` takes, as a tag for the signatures of valid
    calls: "numpy", "emulate" or "cupy" (None for an ``x`` that is not an array)."""
    if type(x) is np.ndarray or isinstance(x, np.ndarray):
        return "emulate" if current_backend() == "emulate" else "numpy"
    return "cupy" if is_cupy_array(x) else None


def dispatch(**arrays: object) -> tuple[object, bool]:
    """(xp, use_kernels): the array module of the inputs and whether the kernel path runs them."""
    xp = array_module(**arrays)
    if xp is not np:
        return xp, True
    return xp, current_backend() == "emulate"


# ---------------------------------------------------------------------------------------------
# Argument checks (raise before anything is launched: a raw kernel checks nothing)
# ---------------------------------------------------------------------------------------------

def as_float_array(xp, a: object, name: str):
    """`a` as an array of xp with a supported floating dtype, else TypeError naming `name`."""
    if a is None:
        raise TypeError(f"{name}: expected an array, got None")
    if xp is np and not isinstance(a, np.ndarray):
        a = np.asarray(a)
    dt = a.dtype
    if not dt.isnative and dt.newbyteorder("=") in FLOAT_DTYPES:
        # big-endian data (from a file, a network buffer): computed as a native copy, as NumPy's
        # own functions do (PyTorch refuses it); results are native-endian
        a = a.astype(dt.newbyteorder("="))
        dt = a.dtype
    if dt not in FLOAT_DTYPES:
        kinds = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: dtype {dt} is not supported; expected a floating dtype ({kinds})")
    return a


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def compute_dtype(dtype) -> np.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything narrower."""
    return _F64 if dtype == _F64 else _F32


def normalize_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """NumPy's `axis` (int or tuple of ints, negatives allowed) as a sorted tuple of distinct axes."""
    if isinstance(axis, (tuple, list)):
        items = list(axis)
    else:
        items = [axis]
    out = []
    for a in items:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(f"{name}: expected an int or a tuple of ints, got {axis!r}") from None
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} is out of bounds for an array of {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axis in {axis!r}")
    if not out:
        raise ValueError(f"{name}: no axis to reduce over")
    return tuple(sorted(out))


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """A single axis (int, negatives allowed)."""
    if isinstance(axis, (tuple, list)):
        raise TypeError(f"{name}: expected a single int, got {axis!r}")
    return normalize_axes(axis, ndim, name)[0]


def check_param(xp, p: object, name: str, kept_shape: tuple[int, ...], keepdims_shape: tuple[int, ...]):
    """A per-feature parameter (gamma, beta, running stats...) as an array of `kept_shape`.

    Accepts the shape of the kept axes, or the same with the reduced axes kept as 1 (the seed's
    (n, 1) column for a (n, m) input). Returns a view of `kept_shape`.
    """
    if p is None:
        return None
    a = as_float_array(xp, p, name)
    if a.shape == kept_shape:
        return a
    if a.shape == keepdims_shape:
        return a.reshape(kept_shape)
    raise ValueError(f"{name}: shape {a.shape} does not match the kept axes {kept_shape}"
                     + (f" (or {keepdims_shape})" if keepdims_shape != kept_shape else ""))


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_real(value: object, name: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name}: {value!r} is outside {rng}")
    return v


# ---------------------------------------------------------------------------------------------
# Output allocation for the kernel path
# ---------------------------------------------------------------------------------------------

_POISON = os.environ.get("GPU_POISON", "0") not in ("", "0")


def poisoning() -> bool:
    """True when kernel outputs are filled with NaN before launch (``GPU_POISON=1`` when ``gpu`` is
    imported; the test suite sets it), so an element a kernel forgets to write shows up as NaN."""
    return _POISON


def empty(xp, shape, dtype):
    """An output array for a kernel to fill: uninitialized, or NaN-filled when `poisoning()`.

    The kernel path's allocation seam: on the emulate backend, inside ``counting_device()``, it is
    counted and returns emulated device memory."""
    if _counts is not None and xp is np:
        out = _emulated_empty(shape, dtype)          # counted as it is created
    else:
        out = xp.empty(shape, dtype=dtype)
    if _POISON:
        out.fill(np.nan if np.dtype(dtype).kind == "f" or np.dtype(dtype) == BFLOAT16 else -1)
    return out


def device_array(xp, shape, dtype, fill=None):
    """Memory the kernel path keeps for itself (workspaces, stand-ins, constants): device memory
    (on the emulate backend an ``EmulatedDeviceArray``), filled with ``fill`` if given."""
    if xp is not np:
        return xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype)
    a = _emulated_empty(shape, dtype)
    if fill is not None:
        a.fill(fill)
    return a


def _emulated_empty(shape, dtype) -> "EmulatedDeviceArray":
    # the device array owns its memory, so every view of it (NumPy links a view to the owner,
    # not to the view it was taken from) is known to be device memory
    return EmulatedDeviceArray(shape, dtype)


# ---------------------------------------------------------------------------------------------
# Emulated device memory: what the emulate backend counts as an allocation or a transfer
# ---------------------------------------------------------------------------------------------

class DeviceCounts:
    """What ``counting_device()`` counted on the emulate backend.

    allocations: device arrays created: by the kernel path's allocation seam (``empty``,
        ``device_array``: outputs, workspaces, ``to_emulated_device``), and every new array (not a
        view) computed from emulated device memory (a ufunc result, a copy, an ``astype``).
    d2h: device values read by the host: ``int``/``float``/``bool``/``operator.index``/``complex``
        of a device array, ``.item()``, ``.tolist()``, ``repr``/``str``, indexing down to a scalar.
        On a GPU each is a copy to the host and a sync.
    h2d: host memory handed to a kernel: an array argument of a launch that is not emulated device
        memory nor a view of it (on a GPU, an upload).
    """

    def __init__(self) -> None:
        self.allocations = 0
        self.d2h = 0
        self.h2d = 0

    def __repr__(self) -> str:
        return f"DeviceCounts(allocations={self.allocations}, d2h={self.d2h}, h2d={self.h2d})"


_counts: DeviceCounts | None = None


@contextlib.contextmanager
def counting_device() -> Iterator[DeviceCounts]:
    """Count allocations and transfers of emulated device memory inside the block (emulate
    backend; one thread: for tests). Outputs of the kernel path allocated inside are
    ``EmulatedDeviceArray``s, so the host's reads of them are counted too.

    >>> import numpy as np, gpu
    >>> from gpu._backend import counting_device, to_emulated_device
    >>> z = to_emulated_device(np.ones((4, 8), np.float32))
    >>> with gpu.use_backend("emulate"), counting_device() as n:   # doctest: +SKIP
    ...     p = gpu.softmax(z)
    >>> n                                                            # doctest: +SKIP
    DeviceCounts(allocations=1, d2h=0, h2d=0)
    """
    global _counts
    saved, _counts = _counts, DeviceCounts()
    try:
        yield _counts
    finally:
        _counts = saved


def counting() -> bool:
    return _counts is not None


def to_emulated_device(a) -> "EmulatedDeviceArray":
    """A copy of ``a`` in emulated device memory (what ``cupy.asarray`` is on a GPU)."""
    a = np.asarray(a)
    out = _emulated_empty(a.shape, a.dtype)
    out[...] = a
    return out


def count_launch_args(args) -> None:
    """Count, as uploads, the array arguments of a launch that are host memory (called by the
    launch seam on the emulate backend inside ``counting_device()``)."""
    c = _counts
    if c is None:
        return
    for a in args:
        if isinstance(a, np.ndarray) and not is_emulated_device(a):
            c.h2d += 1


#: Plain arrays that own the memory of an EmulatedDeviceArray (computed results), by id.
_plain_owners: dict[int, "weakref.ref"] = {}


def is_emulated_device(a) -> bool:
    """Whether ``a`` is emulated device memory or a view of it."""
    while isinstance(a, np.ndarray):
        if isinstance(a, EmulatedDeviceArray):
            return True
        ref = _plain_owners.get(id(a))
        if ref is not None:
            if ref() is a:
                return True
            del _plain_owners[id(a)]      # a dead owner's id, reused
        a = a.base
    return False


def _read() -> None:
    if _counts is not None:
        _counts.d2h += 1


class EmulatedDeviceArray(np.ndarray):
    """A NumPy array that stands for device memory on the emulate backend: it behaves as NumPy's,
    and inside ``counting_device()`` its reads by the host and the new arrays computed from it are
    counted (``DeviceCounts``)."""

    def __array_finalize__(self, obj) -> None:
        base = self.base
        if type(base) is np.ndarray:
            # NumPy computed a result (ufunc, matmul, fancy indexing) into a plain array and views
            # it as this type; later views link to that plain owner: remember it as device memory
            key = id(base)
            _plain_owners[key] = weakref.ref(base, lambda r, k=key: _plain_owners.get(k) is r and _plain_owners.pop(k))
        if _counts is None:
            return
        # owns its data (a copy, astype), or the fresh plain owner of a computed result (not the
        # array it was computed from): an allocation
        if base is None or (type(base) is np.ndarray and base is not obj):
            _counts.allocations += 1

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if not isinstance(out, np.ndarray):
            _read()
        return out

    def __int__(self):
        _read()
        return super().__int__()

    def __float__(self):
        _read()
        return super().__float__()

    def __bool__(self):
        _read()
        return super().__bool__()

    def __index__(self):
        _read()
        return super().__index__()

    def __complex__(self):
        _read()
        return complex(np.asarray(self).item())

    def item(self, *args):
        _read()
        return super().item(*args)

    def tolist(self):
        _read()
        return super().tolist()

    def __repr__(self) -> str:
        _read()
        return repr(np.asarray(self))

    def __str__(self) -> str:
        _read()
        return str(np.asarray(self))
