"""gpu.torch against torch.nn.functional / torch.nn: values, gradients, running statistics,
layouts without copies, errors, gradcheck, torch.compile, the modules and convert().

Every comparison is against torch in float64 on the same (rounded) inputs, by relative error with
the dtype tolerance table of conftest.py. CUDA cases are marked `gpu` and skip without a GPU.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

import gpu.torch as gt  # noqa: E402
from gpu.ops import batch_norm as _bn  # noqa: E402
from gpu.ops import softmax as _sm  # noqa: E402
from gpu.torch import _bridge  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
_NP = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def tol(dtype) -> float:
    if dtype == torch.bfloat16:
        return max(v for k, v in TOL.items() if k.name == "bfloat16")
    return TOL[np.dtype(_NP[dtype])]


def close(out, ref, dtype, what, factor=1.0):
    err = rel_err(out.detach().double().cpu().numpy(), ref.detach().double().cpu().numpy())
    assert err <= tol(dtype) * factor, f"{what}: relative error {err:.3g} > {tol(dtype) * factor:.3g} ({dtype})"


def seeded(request) -> torch.Generator:
    import zlib
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(g, shape, dtype, fmt=torch.contiguous_format, scale=1.0, offset=0.0):
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).contiguous(memory_format=fmt)


def test_import_gpu_does_not_import_torch():
    code = "import sys, gpu; gpu.batch_norm; assert 'torch' not in sys.modules, 'import gpu imported torch'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------
# Batch norm: values, gradients, running statistics, layouts
# ---------------------------------------------------------------------------------------------

# (shape, memory format): every layout the kernels map
LAYOUTS = [
    ((7, 3), torch.contiguous_format),                 # (N, C), 7 rows: not a power of two
    ((1, 5, 4), torch.contiguous_format),              # (N, C, L) with one sample: M = L
    ((3, 4, 5, 6), torch.contiguous_format),           # NCHW
    ((3, 4, 5, 6), torch.channels_last),               # NHWC in memory: the channels-last path
    ((2, 3, 3, 4, 5), torch.contiguous_format),        # NCDHW
    ((2, 3, 3, 4, 5), torch.channels_last_3d),         # NDHWC in memory
]
LAYOUT_IDS = ["NC", "NCL", "NCHW", "NHWC", "NCDHW", "NDHWC"]


def _param_dtype(dtype):
    """float32 parameters and statistics for bfloat16 input (torch's mixed type, as under autocast)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_batch_norm_training_matches_torch(request, shape, fmt, dtype, monkeypatch):
    g = seeded(request)
    C, pdt = shape[1], _param_dtype(dtype)
    w, b = randn(g, (C,), pdt), randn(g, (C,), pdt)
    rm, rv = randn(g, (C,), pdt), randn(g, (C,), pdt).abs() + 0.5
    ref_rm, ref_rv = rm.double(), rv.double()
    nbt = torch.tensor(0)
    calls = []
    real = _bn.batch_norm_forward

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        calls.append((kwargs["axis"], x.__array_interface__["data"][0], out[0].__array_interface__["data"][0]))
        return out

    monkeypatch.setattr(_bn, "batch_norm_forward", spy)
    for step in range(5):
        x = randn(g, shape, dtype, fmt, scale=2.0, offset=0.5).requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = gt.batch_norm(x, rm, rv, wg, bg, training=True, num_batches_tracked=nbt)
        xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = TF.batch_norm(xr, ref_rm, ref_rv, wr, br, training=True)
        dy = randn(g, shape, dtype, fmt)
        grads = torch.autograd.grad(y, (x, wg, bg), dy)
        grads_ref = torch.autograd.grad(yr, (xr, wr, br), dy.double())
        assert y.dtype == dtype and y.stride() == x.stride(), "y keeps the input's dtype and memory format"
        assert grads[0].stride() == x.stride() and grads[0].dtype == dtype
        close(y, yr, dtype, "y")
        for name, got, ref, dt in zip(("dx", "dweight", "dbias"), grads, grads_ref, (dtype, pdt, pdt)):
            assert got.dtype == dt, name
            close(got, ref, dtype, name, factor=4.0)
    close(rm, ref_rm, dtype, "running_mean")
    close(rv, ref_rv, dtype, "running_var")
    assert int(nbt) == 5
    # no layout copy: the op saw the input's own storage, with the features last for channels_last,
    # and the output is the op's own result array
    last = fmt != torch.contiguous_format
    assert calls[-1][0] == (tuple(range(len(shape) - 1)) if last else (0,) + tuple(range(2, len(shape))))
    assert calls[-1][1] == x.data_ptr()
    assert calls[-1][2] == y.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[5]], ids=["NC", "NHWC", "NDHWC"])
def test_batch_norm_eval_matches_torch(request, shape, fmt, dtype):
    g = seeded(request)
    C, pdt = shape[1], _param_dtype(dtype)
    w, b, rm = randn(g, (C,), pdt), randn(g, (C,), pdt), randn(g, (C,), pdt)
    rv = randn(g, (C,), pdt).abs() + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = randn(g, shape, dtype, fmt).requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = gt.batch_norm(x, rm, rv, wg, bg, training=False)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = TF.batch_norm(xr, rm.double(), rv.double(), wr, br, training=False)
    dy = randn(g, shape, dtype, fmt)
    close(y, yr, dtype, "y")
    assert y.stride() == x.stride()
    for got, ref, name in zip(torch.autograd.grad(y, (x, wg, bg), dy), torch.autograd.grad(yr, (xr, wr, br), dy.double()),
                              ("dx", "dweight", "dbias")):
        close(got, ref, dtype, name, factor=4.0)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval mode does not touch the running statistics"


def test_batch_norm_bfloat16_parameters_and_no_running_stats(request):
    # bfloat16 everywhere (no mixed type), and training without running statistics
    g = seeded(request)
    x = randn(g, (6, 3, 4), torch.bfloat16)
    w, b = randn(g, (3,), torch.bfloat16), randn(g, (3,), torch.bfloat16)
    y = gt.batch_norm(x, None, None, w, b, training=True)
    close(y, TF.batch_norm(x.double(), None, None, w.double(), b.double(), training=True), torch.bfloat16, "y")


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_batch_norm_module_momentum_and_num_batches_tracked(request, momentum):
    g = seeded(request)
    ours, ref = gt.BatchNorm2d(3, momentum=momentum).double(), torch.nn.BatchNorm2d(3, momentum=momentum).double()
    for _ in range(5):
        x = randn(g, (4, 3, 2, 3), torch.float64)
        close(ours(x), ref(x), torch.float64, "y")
    for name in ("running_mean", "running_var"):
        close(getattr(ours, name), getattr(ref, name), torch.float64, name)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5
    ours.eval(), ref.eval()
    x = randn(g, (4, 3, 2, 3), torch.float64)
    close(ours(x), ref(x), torch.float64, "eval y")
    assert int(ours.num_batches_tracked) == 5


def test_batch_norm_cumulative_average_functional(request):
    g = seeded(request)
    rm, rv, nbt = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    xs = [randn(g, (5, 3), torch.float64) for _ in range(3)]
    for x in xs:
        gt.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    allx = torch.stack(xs)
    close(rm, allx.mean(1).mean(0), torch.float64, "cumulative mean")
    close(rv, allx.var(1).mean(0), torch.float64, "cumulative var")
    assert int(nbt) == 3


def test_batch_norm_empty_batch():
    # torch returns an empty output for an empty batch, in training too
    x = torch.randn(0, 3)
    assert gt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True).shape == (0, 3)
    assert gt.batch_norm(x, torch.zeros(3), torch.ones(3), training=False).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------

CE_LAYOUTS = [
    ((5,), torch.contiguous_format),             # unbatched (C,)
    ((6, 7), torch.contiguous_format),           # (N, C)
    ((3, 5, 4), torch.contiguous_format),        # (N, C, L): strided class axis
    ((2, 5, 3, 4), torch.contiguous_format),     # (N, C, H, W)
    ((2, 5, 3, 4), torch.channels_last),         # classes last in memory: the row path, no copy
]
CE_IDS = ["C", "NC", "NCL", "NCHW", "NHWC"]
CE_OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.2),
    dict(reduction="none", weight=True),
    dict(reduction="mean", weight=True, label_smoothing=0.1, ignore_index=1),
]


def _targets(g, shape, probs, ignore_index=None):
    C = shape[1] if len(shape) > 1 else shape[0]
    rows = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if probs:
        return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, 1 if len(shape) > 1 else 0)
    t = torch.randint(0, C, rows, generator=g)
    if ignore_index is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore_index
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", CE_OPTIONS, ids=["mean", "sum-ls", "none-w", "mean-w-ls-ignore"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("shape,fmt", CE_LAYOUTS, ids=CE_IDS)
def test_cross_entropy_matches_torch(request, shape, fmt, probs, options, dtype, monkeypatch):
    g = seeded(request)
    C = shape[1] if len(shape) > 1 else shape[0]
    opts = dict(options)
    if opts.pop("weight", False):
        opts["weight"] = randn(g, (C,), dtype).abs() + 0.5
    if probs:
        opts.pop("ignore_index", None)
    z = randn(g, shape, dtype, fmt, scale=3.0).requires_grad_()
    t = _targets(g, shape, probs, opts.get("ignore_index"))
    if probs:
        t = t.to(dtype).contiguous(memory_format=fmt)
    seen = {}
    real = _sm.softmax_cross_entropy

    def spy(za, ta, **kwargs):
        seen.update(axis=kwargs["axis"], ptr=za.__array_interface__["data"][0], grad=kwargs["return_grad"])
        return real(za, ta, **kwargs)

    monkeypatch.setattr(_sm, "softmax_cross_entropy", spy)
    monkeypatch.setattr(_sm, "softmax_cross_entropy_backward", None)     # the backward must not recompute
    loss = gt.cross_entropy(z, t, **opts)
    ref_opts = dict(opts, weight=opts["weight"].double()) if "weight" in opts else opts
    zr = z.detach().double().requires_grad_()
    loss_ref = TF.cross_entropy(zr, t.double() if probs else t, **ref_opts)
    assert loss.dtype == dtype and loss.shape == loss_ref.shape
    close(loss, loss_ref, dtype, "loss")
    dl = randn(g, loss.shape, dtype) if loss.dim() else torch.tensor(1.7, dtype=dtype)
    (dz,), (dz_ref,) = torch.autograd.grad(loss, z, dl), torch.autograd.grad(loss_ref, zr, dl.double())
    close(dz, dz_ref, dtype, "dz", factor=4.0)
    assert dz.stride() == z.stride(), "the gradient keeps the input's memory format"
    last = fmt != torch.contiguous_format
    assert seen == dict(axis=len(shape) - 1 if last else min(1, len(shape) - 1), ptr=z.data_ptr(), grad=True)


def test_cross_entropy_no_grad_computes_no_gradient(monkeypatch):
    seen = {}
    real = _sm.softmax_cross_entropy
    monkeypatch.setattr(_sm, "softmax_cross_entropy", lambda *a, **k: seen.update(k) or real(*a, **k))
    gt.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert seen["return_grad"] is False


def test_cross_entropy_backward_of_the_loss_is_the_forward_dz(monkeypatch):
    # loss.backward() on the CPU: the gradient is the dz array the fused forward wrote, no pass
    seen = {}
    real = _sm.softmax_cross_entropy

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["dz"] = out[1].__array_interface__["data"][0]
        return out

    monkeypatch.setattr(_sm, "softmax_cross_entropy", spy)
    z = torch.randn(6, 4, requires_grad=True)
    gt.cross_entropy(z, torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert z.grad.data_ptr() == seen["dz"]


def test_cross_entropy_probability_target_gradient(request):
    # the target's gradient (soft targets that require grad), computed from log-softmax
    g = seeded(request)
    z = randn(g, (4, 6), torch.float64).requires_grad_()
    t = _targets(g, (4, 6), True).requires_grad_()
    w = randn(g, (6,), torch.float64).abs()
    ours = torch.autograd.grad(gt.cross_entropy(z, t, w, label_smoothing=0.1), (z, t))
    ref = torch.autograd.grad(TF.cross_entropy(z, t, w, label_smoothing=0.1), (z, t))
    for a, b in zip(ours, ref):
        close(a, b, torch.float64, "grad")


def test_cross_entropy_legacy_reduction_arguments():
    z, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning):
        ours = gt.cross_entropy(z, t, size_average=False)
    close(ours, TF.cross_entropy(z, t, reduction="sum"), torch.float64, "loss")


def test_autocast_cpu_matches_torch():
    # under autocast cross_entropy runs in float32 and batch_norm in the input's dtype, as torch
    z, t = torch.randn(4, 5).bfloat16(), torch.tensor([0, 1, 2, 4])
    x, rm, rv = torch.randn(4, 3).bfloat16(), torch.zeros(3), torch.ones(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gt.cross_entropy(z, t).dtype == TF.cross_entropy(z, t).dtype == torch.float32
        assert gt.batch_norm(x, rm, rv, training=True).dtype == TF.batch_norm(x, rm.clone(), rv.clone(), training=True).dtype


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types, messages naming the argument
# ---------------------------------------------------------------------------------------------

_x, _rm, _rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
_z, _t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
BAD = [
    ("running_mean", lambda f: f.batch_norm(_x, torch.zeros(4), torch.ones(4), training=True)),
    ("weight", lambda f: f.batch_norm(_x, _rm, _rv, weight=torch.ones(4), training=True)),
    ("input", lambda f: f.batch_norm(torch.randn(1, 3), _rm, _rv, training=True)),     # one value per channel
    ("input", lambda f: f.batch_norm(torch.randn(1, 3), None, None, training=True)),
    ("running_mean", lambda f: f.batch_norm(_x, None, None, training=False)),
    ("running_mean", lambda f: f.batch_norm(_x, _rm.double(), _rv.double(), training=True)),
    ("running_mean", lambda f: f.batch_norm(_x.double(), _rm, _rv, training=True)),
    ("input", lambda f: f.batch_norm(_x.long(), _rm, _rv, training=True)),
    ("eps", lambda f: f.batch_norm(_x, _rm, _rv, training=True, eps=0.0)),
    ("target", lambda f: f.cross_entropy(_z, torch.tensor([0, 1, 2, 7]))),               # out of range
    ("target", lambda f: f.cross_entropy(_z, torch.tensor([0, 1, 2, -3]))),
    ("target", lambda f: f.cross_entropy(_z, torch.randn(4, 4))),                        # float, wrong shape
    ("target", lambda f: f.cross_entropy(_z, torch.tensor([0, 1, 2]))),                  # batch size
    ("target", lambda f: f.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))),
    ("target", lambda f: f.cross_entropy(_z, _t.int())),
    ("target", lambda f: f.cross_entropy(_z, _t.float())),
    ("weight", lambda f: f.cross_entropy(_z, _t, weight=torch.ones(4))),
    ("weight", lambda f: f.cross_entropy(_z, _t, weight=torch.ones(5).double())),
    ("reduction", lambda f: f.cross_entropy(_z, _t, reduction="avg")),
    ("label_smoothing", lambda f: f.cross_entropy(_z, _t, label_smoothing=1.5)),
    ("ignore_index", lambda f: f.cross_entropy(_z, _t, ignore_index=1.5)),
    ("input", lambda f: f.cross_entropy(_z.long(), _t)),
    ("target", lambda f: f.cross_entropy(_z, _t.to("meta"))),                           # mixed devices
    ("running_mean", lambda f: f.batch_norm(_x, _rm.to("meta"), _rv, training=True)),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_raises_like_torch(name, call):
    try:
        call(TF)
    except Exception as e:
        theirs = e
    else:               # accepted by this torch release (eps=0 in training on torch 2.4): then by us too
        call(gt)
        return
    with pytest.raises(type(theirs), match=name):
        call(gt)


def test_unsupported_device_is_named():
    with pytest.raises(RuntimeError, match="meta"):
        _bridge.to_array(torch.empty(2, device="meta"))


def test_meta_tensors_give_shapes():
    # the fake implementations serve meta tensors: shapes and dtypes without data
    x = torch.empty(4, 3, 5, device="meta")
    assert gt.batch_norm(x, torch.zeros(3, device="meta"), torch.ones(3, device="meta"), training=True).shape == x.shape
    loss = gt.cross_entropy(torch.empty(4, 5, device="meta"), torch.empty(4, dtype=torch.long, device="meta"), reduction="none")
    assert loss.shape == (4,)


# ---------------------------------------------------------------------------------------------
# The kernel path: CPU tensors on the emulator, CUDA tensors on a GPU
# ---------------------------------------------------------------------------------------------

def _kernel_path_parity(device, dtype, fmt):
    """BN training (forward, gradients, running stats) and CE (loss, dz) on `device` against torch
    in float64 on the CPU."""
    g = torch.Generator().manual_seed(7)
    x = randn(g, (4, 3, 5, 6), dtype, fmt).to(device).requires_grad_()
    w, b = (randn(g, (3,), torch.float32).to(device).requires_grad_() for _ in range(2))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = gt.batch_norm(x, rm, rv, w, b, training=True)
    dy = randn(g, (4, 3, 5, 6), dtype, fmt).to(device)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    xr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    rmr, rvr = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    yr = TF.batch_norm(xr, rmr, rvr, wr, br, training=True)
    assert y.device == x.device and y.stride() == x.stride()
    close(y, yr, dtype, "y")
    for got, ref, name in zip(grads, torch.autograd.grad(yr, (xr, wr, br), dy.cpu().double()), ("dx", "dw", "db")):
        close(got, ref, dtype, name, factor=4.0)
    close(rm, rmr, dtype, "running_mean")
    close(rv, rvr, dtype, "running_var")
    z = randn(g, (4, 7, 3, 2), dtype, fmt, scale=3.0).to(device).requires_grad_()
    t = torch.randint(0, 7, (4, 3, 2), generator=g).to(device)
    loss = gt.cross_entropy(z, t, label_smoothing=0.1)
    (dz,) = torch.autograd.grad(loss, z)
    zr = z.detach().cpu().double().requires_grad_()
    loss_ref = TF.cross_entropy(zr, t.cpu(), label_smoothing=0.1)
    close(loss, loss_ref, dtype, "loss")
    close(dz, torch.autograd.grad(loss_ref, zr)[0], dtype, "dz", factor=4.0)
    assert dz.stride() == z.stride()


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_kernels_through_torch(dtype):
    import gpu
    with gpu.use_backend("emulate"):
        _kernel_path_parity("cpu", dtype, torch.channels_last)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_tensors_match_torch(dtype, fmt):
    _cuda()
    _kernel_path_parity("cuda", dtype, fmt)


@pytest.mark.gpu
def test_cuda_outputs_come_from_torchs_allocator_on_its_stream(monkeypatch):
    # every allocation of the ops goes through torch's caching allocator, on torch's current stream
    _cuda()
    import cupy
    calls = []
    real = torch.cuda.caching_allocator_alloc
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc",
                        lambda size, device=None, stream=None: calls.append(stream) or real(size, device, stream))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(64, 32, device="cuda", requires_grad=True)
        pool_before = cupy.get_default_memory_pool().used_bytes()
        y = gt.batch_norm(x, None, None, training=True)
        y.sum().backward()
        gt.cross_entropy(torch.randn(8, 5, device="cuda"), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device="cuda"))
    assert calls and all(s == side.cuda_stream for s in calls)
    assert cupy.get_default_memory_pool().used_bytes() == pool_before, "nothing from CuPy's pool"
    torch.cuda.synchronize()
    close(y, TF.batch_norm(x.detach().double(), None, None, training=True), torch.float32, "y")


@pytest.mark.gpu
def test_cuda_autocast_matches_torch():
    # autocast: cross-entropy in float32; batch norm in the input's float16 with float32 statistics
    _cuda()
    conv = torch.nn.Conv2d(3, 4, 3).cuda()
    bn, bn_ref = gt.BatchNorm2d(4).cuda(), torch.nn.BatchNorm2d(4).cuda()
    x = torch.randn(8, 3, 10, 10, device="cuda")
    t = torch.randint(0, 4, (8, 8, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        h = conv(x)
        y, y_ref = bn(h), bn_ref(h)
        loss, loss_ref = gt.cross_entropy(y, t), TF.cross_entropy(y_ref, t)
    assert y.dtype == y_ref.dtype == torch.float16 and bn.running_mean.dtype == torch.float32
    assert loss.dtype == loss_ref.dtype == torch.float32
    close(loss, loss_ref, torch.float16, "loss")
    close(bn.running_var, bn_ref.running_var, torch.float16, "running_var")


# ---------------------------------------------------------------------------------------------
# gradcheck, double backward, torch.compile
# ---------------------------------------------------------------------------------------------

def test_gradcheck_batch_norm(request):
    g = seeded(request)
    x = randn(g, (4, 3, 5), torch.float64).requires_grad_()
    w = randn(g, (3,), torch.float64).requires_grad_()
    b = randn(g, (3,), torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: gt.batch_norm(x, None, None, w, b, training=True), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: gt.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))
    xl = randn(g, (2, 3, 2, 3), torch.float64, torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gt.batch_norm(x, None, None, training=True), (xl,))


def test_gradcheck_cross_entropy(request):
    g = seeded(request)
    z = randn(g, (5, 4), torch.float64).requires_grad_()
    t = torch.tensor([0, 3, 1, -100, 2])
    w = randn(g, (4,), torch.float64).abs() + 0.5
    assert torch.autograd.gradcheck(lambda z: gt.cross_entropy(z, t, w, label_smoothing=0.1), (z,))
    assert torch.autograd.gradcheck(lambda z: gt.cross_entropy(z, t, reduction="none"), (z,))
    p = _targets(g, (5, 4), True).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, p: gt.cross_entropy(z, p, w, reduction="sum"), (z, p))


def test_double_backward_raises():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(gt.batch_norm(x, None, None, training=True).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (dz,) = torch.autograd.grad(gt.cross_entropy(z, torch.tensor([0, 1, 2, 0])), z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dz.sum().backward()


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 10)).double()


def _compiled_step(backend):
    torch._dynamo.reset()
    model, ref = gt.convert(_small_cnn()), _small_cnn()
    crit = gt.CrossEntropyLoss(label_smoothing=0.1)
    step = torch.compile(lambda x, t: crit(model(x), t), backend=backend, fullgraph=True)
    x, t = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = step(x, t)
    loss.backward()
    loss_ref = TF.cross_entropy(ref(x), t, label_smoothing=0.1)
    loss_ref.backward()
    close(loss, loss_ref, torch.float64, "compiled loss")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad.norm() < 1e-10:   # a bias before batch norm: its true gradient is 0, both are rounding
            assert p.grad.abs().max() < 1e-10, name
        else:
            close(p.grad, q.grad, torch.float64, f"grad of {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        close(getattr(model[1], name).double(), getattr(ref[1], name).double(), torch.float64, name)


def test_compile_fullgraph_aot_eager():
    _compiled_step("aot_eager")


def test_compile_no_graph_break():
    torch._dynamo.reset()
    model = gt.convert(_small_cnn())
    explain = torch._dynamo.explain(lambda x, t: gt.cross_entropy(model(x), t))(
        torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,)))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPU_TEST_INDUCTOR", "0") in ("", "0"),
                    reason="inductor compiles C++ for about 75 s on 2 cores: set GPU_TEST_INDUCTOR=1")
def test_compile_fullgraph_inductor():
    _compiled_step("inductor")


# ---------------------------------------------------------------------------------------------
# Modules and convert()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ours,theirs,shape", [(gt.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
                                               (gt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 2)),
                                               (gt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2))])
def test_batch_norm_modules_mirror_torch(ours, theirs, shape):
    kw = dict(eps=1e-3, momentum=0.2, affine=True, track_running_stats=True, dtype=torch.float64)
    a, b = ours(3, **kw), theirs(3, **kw)
    assert repr(a).split("(", 1)[1] == repr(b).split("(", 1)[1] and a.extra_repr() == b.extra_repr()
    assert list(a.state_dict()) == list(b.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    x = torch.randn(shape, dtype=torch.float64)
    a(x), b(x)
    # a checkpoint of ours loads into torch's module and back
    c, d = theirs(3, **kw), ours(3, **kw)
    c.load_state_dict(a.state_dict())
    d.load_state_dict(c.state_dict())
    for k, v in b.state_dict().items():
        assert torch.allclose(c.state_dict()[k].double(), v.double()) and torch.equal(d.state_dict()[k], c.state_dict()[k]), k
    bad = torch.randn(2, 3) if len(shape) != 2 + (theirs is torch.nn.BatchNorm1d) else torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError) as theirs_err:
        b(torch.randn(3) if theirs is torch.nn.BatchNorm1d else bad)
    with pytest.raises(ValueError, match=str(theirs_err.value).replace("(", r"\(").replace(")", r"\)")):
        a(torch.randn(3) if theirs is torch.nn.BatchNorm1d else bad)


def test_batch_norm_module_options():
    for kw in (dict(affine=False), dict(track_running_stats=False), dict(bias=False)):
        if "bias" in kw and "bias" not in torch.nn.BatchNorm1d.__init__.__code__.co_varnames:
            continue
        a, b = gt.BatchNorm1d(3, **kw).double(), torch.nn.BatchNorm1d(3, **kw).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        close(a(x), b(x), torch.float64, str(kw))
        a.eval(), b.eval()
        close(a(x), b(x), torch.float64, f"eval {kw}")


def test_cross_entropy_loss_module():
    w = torch.rand(5, dtype=torch.float64) + 0.5
    a = gt.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    b = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    z, t = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 2])
    close(a(z, t), b(z, t), torch.float64, "loss")
    assert a.extra_repr() == b.extra_repr() and list(a.state_dict()) == list(b.state_dict()) == ["weight"]


def test_convert_keeps_parameters_buffers_and_mode():
    model = _small_cnn()
    model[5].eval()
    model[1].weight.requires_grad_(False)
    sync = torch.nn.SyncBatchNorm(4)
    model.add_module("sync", sync)
    before = dict(model.named_parameters()), dict(model.named_buffers())
    out = gt.convert(model)
    assert out is model and type(model[1]) is gt.BatchNorm2d and type(model[5]) is gt.BatchNorm1d
    assert model.sync is sync and type(model[0]) is torch.nn.Conv2d
    after = dict(model.named_parameters()), dict(model.named_buffers())
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(b[k] is a[k] for k in b), "the same tensors, not copies"
    assert not model[1].weight.requires_grad and model[1].training and not model[5].training
    assert isinstance(gt.convert(torch.nn.BatchNorm2d(3)), gt.BatchNorm2d)


def test_convert_digits_cnn_trains_like_torch():
    # 50 steps on the bundled 8x8 digits, float64 CPU, same seed: the loss curves agree to 1e-4
    pytest.importorskip("sklearn")
    from gpu.nn.data import load_dataset
    data = load_dataset("digits")
    X = torch.from_numpy(np.asarray(data.X, np.float64) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(np.asarray(data.y, np.int64))
    curves = []
    for swap in (False, True):
        model = _small_cnn(seed=1)
        crit = torch.nn.CrossEntropyLoss()
        if swap:
            model, crit = gt.convert(model), gt.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        losses = []
        for step in range(50):
            idx = order[(step * 32) % len(X):][:32]
            opt.zero_grad()
            loss = crit(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(np.array(losses))
    assert curves[0][-1] < curves[0][0] * 0.5, "the model learns"
    np.testing.assert_allclose(curves[1], curves[0], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# gpu-bench --framework torch
# ---------------------------------------------------------------------------------------------

def test_bench_framework_torch_rows(tmp_path, capsys):
    import json
    from gpu.bench import main
    path = tmp_path / "b.json"
    assert main(["--framework", "torch", "--device", "cpu", "--shape", "64x16", "--repeat", "2", "--warmup", "0",
                 "--budget", "0", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["peer"]) for r in rows} == {
        (op, peer) for op in ("batch_norm_train", "softmax_cross_entropy_train") for peer in ("ours", "ours-torch", "torch-cpu")}
    assert all(r["status"] == "ok" for r in rows), rows
    interop = [r for r in rows if r["peer"] == "ours-torch"]
    assert all(r["interop_ms"] is not None for r in interop)
    assert "interop ms" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# gpu-train --framework torch
# ---------------------------------------------------------------------------------------------

def test_train_framework_torch_follows_the_gpu_nn_path(tmp_path):
    # the same MLP, initial weights, batches and optimizer: the same run up to float32 rounding.
    # SGD, not the default Adam: Adam's first steps move every weight by about lr whatever the
    # gradient's size, so a gradient that is zero up to rounding (sign flipped between the two
    # frameworks' GEMMs) becomes a full-size difference (3e-4 in the validation loss after one step)
    import json
    pytest.importorskip("sklearn")
    from gpu.train import main
    runs = {}
    for fw in ("nn", "torch"):
        path = tmp_path / f"{fw}.json"
        assert main(["--dataset", "digits", "--framework", fw, "--epochs", "1", "--max-steps", "40", "--quiet",
                     "--optimizer", "sgd",
                     "--json", str(path)]) == 0
        runs[fw] = json.loads(path.read_text())["runs"]["with BN"]
    for key in ("final_train_loss", "final_val_loss", "final_val_acc"):
        assert runs["torch"][key] == pytest.approx(runs["nn"][key], rel=1e-5, abs=1e-6), key


def test_torch_model_mirrors_gpu_nn_model():
    from gpu.nn import mlp
    from gpu.torch.train import to_torch
    model = mlp([6, 5, 3], activation="tanh", seed=3)
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    tm = to_torch(model)
    assert isinstance(tm[1], gt.BatchNorm1d)
    close(tm(torch.from_numpy(x)), torch.from_numpy(np.asarray(model.forward(x))), torch.float32, "logits")
