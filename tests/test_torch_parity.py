"""gpu.torch against torch.nn.functional in the corners: non-finite logits in ignored rows, negative
label smoothing, retained graphs, probability targets' options, and torch's exception types.

Every numerical case runs on the NumPy path and through the kernels on the emulator, in float64,
against torch's own F.cross_entropy / F.batch_norm on the same CPU tensors.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import gpu  # noqa: E402
import gpu.torch as gt  # noqa: E402

from conftest import TOL  # noqa: E402

INF, NAN = float("inf"), float("nan")
BACKENDS = ["numpy", pytest.param("emulate", marks=pytest.mark.kernel)]
F64 = TOL[np.dtype(np.float64)] * 1e3       # torch's own float64 loss differs in rounding order


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=F64, atol=F64, equal_nan=False)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


# ---------------------------------------------------------------------------------------------
# Ignored rows: exactly 0 loss and 0 gradient whatever their logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-INF, INF, NAN], ids=["-inf", "+inf", "nan"])
@pytest.mark.parametrize("shape", [
    (4, 5),          # a lane group per row
    (3, 3000),       # a block per row (C past the warp path)
    (2, 5, 3),       # strided: the class axis is not the last
])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"reduction": "sum"},
                                  {"z_loss": 1e-3}, {"softcap": 5.0}], ids=str)
def test_ignored_row_with_nonfinite_logits(backend, bad, shape, opts):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64, generator=g)
    C = shape[1]
    rows = (shape[0],) + shape[2:]
    t = torch.randint(0, C, rows, generator=g)
    t[0] = -100                         # row 0 (every position of it) ignored, with a bad logit
    z[0, 0] = bad
    z[0, C - 1] = bad
    w = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    ref_opts = {k: v for k, v in opts.items() if k in ("label_smoothing", "reduction")}
    for weight in (None, w):
        z1, z2 = _leaves(z.requires_grad_(), z)
        with gpu.use_backend(backend):
            out = gt.cross_entropy(z1, t, weight=weight, **opts)
        if "z_loss" in opts or "softcap" in opts:
            # no torch counterpart: the ignored row must be exactly absent, as if the row were not there
            keep = z2[1:].detach().clone().requires_grad_()
            with gpu.use_backend(backend):
                ref = gt.cross_entropy(keep, t[1:], weight=weight, **opts)
            _close(out, ref)
            out.sum().backward()
            ref.sum().backward()
            assert torch.equal(z1.grad[0], torch.zeros_like(z1.grad[0]))
            _close(z1.grad[1:], keep.grad)
            continue
        ref = F.cross_entropy(z2, t, weight=weight, **ref_opts)
        assert torch.isfinite(out).all()
        _close(out, ref)
        out.sum().backward()
        ref.sum().backward()
        assert torch.equal(z1.grad[0], torch.zeros_like(z1.grad[0]))
        _close(z1.grad, torch.nan_to_num(z2.grad))    # torch: NaN where its ignored row reads +inf/NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-INF, INF, NAN], ids=["-inf", "+inf", "nan"])
def test_ignored_row_array_api_backends_agree(backend, bad):
    z = np.random.default_rng(1).standard_normal((3, 4))
    z[1, :2] = bad
    t = np.array([2, -100, 0])
    with gpu.use_backend(backend):
        loss, dz = gpu.softmax_cross_entropy(z, t, reduction="none", return_grad=True)
    assert loss[1] == 0 and np.all(dz[1] == 0)
    ref = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(t), reduction="none")
    np.testing.assert_allclose(loss, ref.numpy(), rtol=F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_minus_inf_bias_with_ignored_rows(backend):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g)
    b[3] = -INF                         # a masked class
    b.requires_grad_()
    t = torch.tensor([0, -100, 2, -100, 6])
    h2, W2, b2 = _leaves(h, W, b)
    with gpu.use_backend(backend):
        loss = gt.fused_linear_cross_entropy(h, W, t, b)
    ref = F.cross_entropy(F.linear(h2, W2, b2), t)
    _close(loss, ref)
    loss.backward()
    ref.backward()
    for a, r in ((h, h2), (W, W2), (b, b2)):
        _close(a.grad, r.grad)


# ---------------------------------------------------------------------------------------------
# Probability targets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ls", [-0.2, 0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 3, 5)])
def test_probability_target_and_weight_gradients(backend, ls, reduction, shape):
    g = torch.Generator().manual_seed(3)
    C = shape[1] if len(shape) > 1 else shape[0]
    z = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    p = torch.rand(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    ours, theirs = [z, p, w], _leaves(z, p, w)
    with gpu.use_backend(backend):
        out = gt.cross_entropy(*ours[:2], weight=ours[2], reduction=reduction, label_smoothing=ls)
    ref = F.cross_entropy(*theirs[:2], weight=theirs[2], reduction=reduction, label_smoothing=ls)
    _close(out, ref)
    up = torch.rand(out.shape, dtype=torch.float64, generator=g) + 0.5
    out.backward(up)
    ref.backward(up)
    for a, r in zip(ours, theirs):
        _close(a.grad, r.grad)


def test_issue_example_negative_label_smoothing():
    p = torch.tensor([[.2, .5, .3]], requires_grad=True)
    gt.cross_entropy(torch.tensor([[1., 2., .5]]), p, label_smoothing=-0.2).backward()
    p2 = p.detach().clone().requires_grad_()
    F.cross_entropy(torch.tensor([[1., 2., .5]]), p2, label_smoothing=-0.2).backward()
    torch.testing.assert_close(p.grad, p2.grad)


@pytest.mark.parametrize("ignore_index", [0, 2, 7])
def test_probability_target_refuses_ignore_index(ignore_index):
    z, p = torch.randn(2, 3), torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(z, p, ignore_index=ignore_index)
    with pytest.raises(RuntimeError, match="ignore_index"):
        gt.cross_entropy(z, p, ignore_index=ignore_index)
    for neg in (-1, -100):              # a negative one ignores nothing: accepted by both
        _close(gt.cross_entropy(z.double(), p.double(), ignore_index=neg),
               F.cross_entropy(z.double(), p.double(), ignore_index=neg))


# ---------------------------------------------------------------------------------------------
# The backward never hands out a tensor a later backward reads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_retained_graph(backend):
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    with gpu.use_backend(backend):
        loss = gt.cross_entropy(z, t)
        for _ in range(3):
            loss.backward(retain_graph=True)
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        g.mul_(100)                     # a gradient handed out may be changed in place...
        loss.backward()                 # ...without changing the next pass
    z2 = z.detach().clone().requires_grad_()
    F.cross_entropy(z2, t).backward()
    _close(z.grad, 4 * z2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_retained_graph(backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    with gpu.use_backend(backend):
        loss = gt.fused_linear_cross_entropy(h, W, t, b)
        for _ in range(3):
            loss.backward(retain_graph=True)
        loss.backward()
    h2, W2, b2 = _leaves(h, W, b)
    F.cross_entropy(F.linear(h2, W2, b2), t).backward()
    for a, r in ((h, h2), (W, W2), (b, b2)):
        _close(a.grad, 4 * r.grad)


# ---------------------------------------------------------------------------------------------
# Exceptions: torch's types where gpu.torch refuses, and refusals where torch refuses
# ---------------------------------------------------------------------------------------------

def _same_error(call, exc, match):
    """torch.nn.functional's call raises `exc`, and so does gpu.torch's with a message matching `match`."""
    with pytest.raises(exc):
        call(F)
    with pytest.raises(exc, match=match):
        call(gt)


X = torch.randn(4, 3)


@pytest.mark.parametrize("case", [
    # (call on F or gt, exception, what gpu.torch's message names)
    (lambda m: m.batch_norm(X, torch.zeros(3), None, training=False), RuntimeError, "running_var"),
    (lambda m: m.batch_norm(X, None, torch.ones(3), training=False), RuntimeError, "running_mean"),
    (lambda m: m.batch_norm(X, torch.zeros(3), None, training=True), ValueError, "running_mean, running_var"),
    (lambda m: m.batch_norm(X, torch.zeros(3), torch.ones(3), momentum=None), TypeError, "momentum"),
    (lambda m: m.batch_norm(X, None, None, training=True, momentum=None), TypeError, "momentum"),
    (lambda m: m.batch_norm(X, torch.zeros(3, 1), torch.ones(3, 1)), RuntimeError, "running_mean"),
    (lambda m: m.batch_norm(X, torch.zeros(3), torch.ones(1, 3), training=True), RuntimeError, "running_var"),
    (lambda m: m.batch_norm(X, torch.zeros(3), torch.ones(3), training="yes"), TypeError, "training"),
    (lambda m: m.batch_norm(X, torch.zeros(3), torch.ones(3), training=1), TypeError, "training"),
    (lambda m: m.batch_norm(X, torch.zeros(3, requires_grad=True), torch.ones(3), training=True),
     RuntimeError, "running_mean"),
    (lambda m: m.batch_norm(X, torch.zeros(3), torch.ones(3, requires_grad=True)), RuntimeError, "running_var"),
    (lambda m: m.cross_entropy(torch.randn(2, 3), torch.rand(3, 3)), ValueError, "batch_size"),
    (lambda m: m.cross_entropy(torch.randn(2, 3), torch.rand(3)), ValueError, "batch_size"),
    (lambda m: m.cross_entropy(torch.randn(2, 3), torch.tensor(1)), ValueError, "batch_size"),
    (lambda m: m.cross_entropy(torch.randn(2, 3, 4), torch.tensor(1)), ValueError, "batch_size"),
    (lambda m: m.cross_entropy(torch.randn(2, 3), torch.rand(2)), RuntimeError, "target"),
    (lambda m: m.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8)), RuntimeError,
     "uint8"),
    (lambda m: m.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), weight=torch.ones(3, requires_grad=True)),
     RuntimeError, "weight"),
], ids=lambda c: None)
def test_exceptions_match_torch(case):
    call, exc, match = case
    _same_error(call, exc, match)


def test_accepted_where_torch_accepts():
    z = torch.randn(2, 3, dtype=torch.float64)
    # uint8 class indices for (N, C) and (C,) inputs
    for inp, t in ((z, torch.tensor([0, 2], dtype=torch.uint8)), (z[0], torch.tensor(1, dtype=torch.uint8))):
        _close(gt.cross_entropy(inp, t), F.cross_entropy(inp, t))
    # running statistics or class weights that require grad, outside grad mode
    with torch.no_grad():
        gt.cross_entropy(z, torch.tensor([0, 1]), weight=torch.ones(3, dtype=torch.float64, requires_grad=True))
        gt.batch_norm(X, torch.zeros(3, requires_grad=True), torch.ones(3), training=True)
    # weight of shape (C, 1): torch reads it as (C,)
    x = X.double()
    _close(gt.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                         torch.full((3, 1), 2.0, dtype=torch.float64)),
           F.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                        torch.full((3, 1), 2.0, dtype=torch.float64)))
    # momentum=None with num_batches_tracked: the cumulative average (gpu.torch's addition)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.int64)
    gt.batch_norm(X, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    torch.testing.assert_close(rm, X.mean(0))
    assert int(nbt) == 1


def test_flce_ce_weight_requires_grad():
    h, W, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    w = torch.ones(5, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.cross_entropy(F.linear(h, W), t, weight=w)
    with pytest.raises(RuntimeError, match="ce_weight"):
        gt.fused_linear_cross_entropy(h, W, t, ce_weight=w)
    with torch.no_grad():
        gt.fused_linear_cross_entropy(h, W, t, ce_weight=w)
