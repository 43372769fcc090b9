"""gpu.torch.fused_linear_cross_entropy / FusedLinearCrossEntropyLoss and cross_entropy's z_loss,
softcap and return_z_loss, against the float64 references of gpu.bench.reference that
materialize the logits: loss, z-term and every gradient, gradcheck, torch.compile, errors, and
the deferred bad-target record on the kernel path (the emulator; CUDA where a GPU exists).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

import gpu  # noqa: E402
import gpu.torch as gt  # noqa: E402
from gpu.bench import reference as R  # noqa: E402
from gpu.ops import linear_cross_entropy as _lce  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402


def tol(dtype) -> float:
    if dtype == torch.bfloat16:
        return max(v for k, v in TOL.items() if k.name == "bfloat16")
    return TOL[np.dtype({torch.float64: np.float64, torch.float32: np.float32}[dtype])]


def close(out, ref, dtype, what, factor=1.0):
    out = out.detach().double().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
    err = rel_err(out, np.asarray(ref, np.float64))
    assert err <= tol(dtype) * factor, f"{what}: relative error {err:.3g} > {tol(dtype) * factor:.3g} ({dtype})"


def seeded(request) -> torch.Generator:
    import zlib
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def problem(g, N, H, V, dtype, bias=True, ce_weight=False, ignore=False, device="cpu"):
    """h (N, H), W (V, H), targets (every third ignored with `ignore`), bias, class weights."""
    h = (torch.randn(N, H, generator=g, dtype=torch.float64)).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 1:
        t[::3] = -100
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(torch.float32 if dtype != torch.float64 else dtype) \
        if ce_weight else None
    to = (lambda x: None if x is None else x.to(device))
    return to(h), to(W), to(t), to(b), to(w)


def reference(h, W, t, b, w, dloss=1.0, **opts):
    """(loss, z_term, dh, dW, dbias) in float64 with the logits materialized."""
    n = lambda x: None if x is None else x.detach().double().cpu().numpy()   # noqa: E731
    return R.linear_cross_entropy(n(h), n(W), t.cpu().numpy(), n(b), opts.get("reduction", "mean"),
                                  opts.get("ignore_index", -100), opts.get("label_smoothing", 0.0), n(w),
                                  n(dloss) if isinstance(dloss, torch.Tensor) else dloss,
                                  z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))


OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2),
    dict(reduction="none", softcap=2.0, z_loss=1e-3),
    dict(reduction="mean", ce_weight=True, ignore=True, z_loss=1e-2, softcap=3.0, label_smoothing=0.2),
    dict(reduction="none", ce_weight=True, ignore=True, label_smoothing=0.1),
]
OPTION_IDS = ["plain", "sum-ls-z", "none-cap-z", "mean-w-ignore-z-cap-ls", "none-w-ignore-ls"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("N,V,chunk", [
    (11, 7, 1),             # one row a chunk
    (11, 7, 5),             # a prime chunk that does not divide the rows (a short last chunk)
    (11, 7, 64),            # one chunk larger than all rows
    (6, 1, None),           # vocab 1: every loss 0 (but the z-loss), dz 0
    (3, 50257, None),       # GPT-2's vocabulary, automatic chunk
], ids=["chunk1", "chunk5", "chunk-all", "vocab1", "vocab50257"])
def test_fused_linear_cross_entropy_matches_reference(request, N, V, chunk, options, dtype):
    g = seeded(request)
    opts = dict(options)
    h, W, t, b, w = problem(g, N, 16, V, dtype, ce_weight=opts.pop("ce_weight", False),
                            ignore=opts.pop("ignore", False))
    h, W, b = (x.requires_grad_() for x in (h, W, b))
    loss, z_term = gt.fused_linear_cross_entropy(h, W, t, b, ce_weight=w, chunk_size=chunk, return_z_loss=True, **opts)
    dl = (torch.randn(loss.shape, generator=g, dtype=torch.float64).to(dtype) if loss.dim()
          else torch.tensor(1.7, dtype=dtype))
    grads = torch.autograd.grad(loss, (h, W, b), dl)
    ref = reference(h, W, t, b, w, dl, **opts)
    assert loss.dtype == dtype and loss.shape == np.shape(ref[0]) and not z_term.requires_grad
    close(loss, ref[0], dtype, "loss")
    close(z_term, ref[1], dtype, "z_term")
    for name, got, want, x in zip(("dh", "dW", "dbias"), grads, ref[2:], (h, W, b)):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        close(got, want, dtype, name, factor=4.0)


def test_fused_linear_cross_entropy_nd_input_and_no_bias(request):
    # (batch, sequence, hidden) hidden states, as a language model's, without a bias
    g = seeded(request)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (2, 5), generator=g)
    loss = gt.fused_linear_cross_entropy(h, W, t, reduction="none", chunk_size=3)
    assert loss.shape == (2, 5)
    ref = TF.cross_entropy(TF.linear(h, W).transpose(1, 2), t, reduction="none")
    close(loss, ref.detach(), torch.float64, "loss")
    dl = torch.randn(2, 5, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(loss, (h, W), dl), torch.autograd.grad(ref, (h, W), dl)):
        close(got, want, torch.float64, "grad")


def test_gradients_come_from_the_forward_pass(monkeypatch):
    # 'mean'/'sum': one chunked pass computes loss and gradients, the backward only scales them;
    # 'none': the backward runs the pass again with the per-row upstream gradients; no grad: no
    # gradients computed
    calls = []
    real = _lce.fused_linear_cross_entropy
    monkeypatch.setattr(_lce, "fused_linear_cross_entropy",
                        lambda *a, **k: calls.append((k["return_grad"], np.ndim(k["dloss"]))) or real(*a, **k))
    h, W = torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    (gt.fused_linear_cross_entropy(h, W, t) * 3).backward()
    assert calls == [(True, 0)]
    calls.clear()
    gt.fused_linear_cross_entropy(h, W, t, reduction="none").sum().backward()
    assert calls == [(False, 0), (True, 1)]
    calls.clear()
    with torch.no_grad():
        gt.fused_linear_cross_entropy(h, W, t)
    gt.fused_linear_cross_entropy(h.detach(), W.detach(), t)
    assert calls == [(False, 0), (False, 0)]


def test_retain_graph_backward_twice_and_double_backward():
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = gt.fused_linear_cross_entropy(h, W, torch.tensor([0, 1, 2, 3, 4, 0]))
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()      # the saved gradients are not modified by the first accumulation
    close(h.grad, 2 * first.numpy(), torch.float64, "dh twice")
    (dh,) = torch.autograd.grad(gt.fused_linear_cross_entropy(h, W, torch.tensor([0, 1, 2, 3, 4, 0])), h,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dh.sum().backward()


def test_gradcheck_fused_linear_cross_entropy(request):
    g = seeded(request)
    h, W, t, b, w = problem(g, 7, 5, 6, torch.float64, ce_weight=True, ignore=True)
    h, W, b = (x.requires_grad_() for x in (h, W, b))
    opts = dict(ce_weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=2.5, chunk_size=3)
    assert torch.autograd.gradcheck(lambda h, W, b: gt.fused_linear_cross_entropy(h, W, t, b, **opts), (h, W, b))
    assert torch.autograd.gradcheck(
        lambda h, W, b: gt.fused_linear_cross_entropy(h, W, t, b, reduction="none", **opts), (h, W, b))
    assert torch.autograd.gradcheck(
        lambda h, W: gt.fused_linear_cross_entropy(h, W, t, reduction="sum", z_loss=0.1), (h, W))


# ---------------------------------------------------------------------------------------------
# cross_entropy: z_loss, softcap, return_z_loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_cross_entropy_z_loss_softcap_matches_reference(request, fmt, reduction, probs):
    g = seeded(request)
    shape = (3, 5, 2, 3)            # (N, C, H, W): the class axis 1, or last in memory for channels_last
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).contiguous(memory_format=fmt).requires_grad_()
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    if probs:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, 5, (3, 2, 3), generator=g)
        t.view(-1)[::4] = -100
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=2.0)
    loss, z_term = gt.cross_entropy(z, t, w, return_z_loss=True, **opts)
    dl = torch.randn(loss.shape, generator=g, dtype=torch.float64) if loss.dim() else torch.tensor(0.7, dtype=torch.float64)
    (dz,) = torch.autograd.grad(loss, z, dl)
    rl, rz, rdz = R.softmax_cross_entropy(z.detach().numpy(), t.numpy(), 1, reduction, -100, 0.1, w.numpy(),
                                          dl.numpy(), z_loss=1e-2, softcap=2.0, return_z_loss=True)
    close(loss, rl, torch.float64, "loss")
    close(z_term, rz, torch.float64, "z_term")
    close(dz, rdz, torch.float64, "dz")
    assert not z_term.requires_grad and dz.stride() == z.stride()


def test_cross_entropy_softcap_probability_target_gradient(request):
    # the target's gradient reads the capped logits: against torch on softcap * tanh(z / softcap)
    g = seeded(request)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), 1).requires_grad_()
    ours = gt.cross_entropy(z, p, label_smoothing=0.1, softcap=1.5, z_loss=1e-2)
    capped = 1.5 * torch.tanh(z / 1.5)
    theirs = TF.cross_entropy(capped, p, label_smoothing=0.1) + 1e-2 * torch.logsumexp(capped, 1).pow(2).mean()
    close(ours, theirs.detach(), torch.float64, "loss")
    for a, b in zip(torch.autograd.grad(ours, (z, p)), torch.autograd.grad(theirs, (z, p))):
        close(a, b, torch.float64, "grad")


def test_gradcheck_cross_entropy_z_loss_softcap(request):
    g = seeded(request)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 1, -100, 2])
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda z: gt.cross_entropy(z, t, w, label_smoothing=0.1, z_loss=1e-2, softcap=2.0), (z,))
    assert torch.autograd.gradcheck(lambda z: gt.cross_entropy(z, t, reduction="none", z_loss=0.1, softcap=1.0), (z,))
    p = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, p: gt.cross_entropy(z, p, w, reduction="sum", z_loss=1e-2, softcap=2.0),
                                    (z, p))


def test_cross_entropy_loss_module_options():
    z, t = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 2])
    crit = gt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, return_z_loss=True)
    loss, z_term = crit(z, t)
    rl, rz, _ = R.softmax_cross_entropy(z.numpy(), t.numpy(), 1, "mean", -100, 0.1, None, grad=False,
                                        z_loss=1e-2, softcap=3.0, return_z_loss=True)
    close(loss, rl, torch.float64, "loss")
    close(z_term, rz, torch.float64, "z_term")
    assert "z_loss=0.01" in repr(crit) and "softcap=3.0" in repr(crit)
    assert gt.CrossEntropyLoss().extra_repr() == torch.nn.CrossEntropyLoss().extra_repr()


# ---------------------------------------------------------------------------------------------
# The module, torch.compile, meta tensors
# ---------------------------------------------------------------------------------------------

def test_module_mirrors_liger_and_matches_the_function(request):
    # forward(lin_weight, _input, target, bias=None): the weight first, as Liger-Kernel's
    g = seeded(request)
    h, W, t, b, w = problem(g, 9, 6, 11, torch.float64, ce_weight=True, ignore=True)
    crit = gt.FusedLinearCrossEntropyLoss(ce_weight=w, z_loss=1e-3, label_smoothing=0.1, softcap=4.0,
                                          return_z_loss=True, chunk_size=4)
    loss, z_term = crit(W, h, t, b)
    ref = reference(h, W, t, b, w, z_loss=1e-3, label_smoothing=0.1, softcap=4.0)
    close(loss, ref[0], torch.float64, "loss")
    close(z_term, ref[1], torch.float64, "z_term")
    assert list(crit.state_dict()) == ["ce_weight"] and list(gt.FusedLinearCrossEntropyLoss().state_dict()) == []
    assert "z_loss=0.001" in repr(crit)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=17, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = gt.FusedLinearCrossEntropyLoss(z_loss=1e-3, chunk_size=5)

    def forward(self, tokens, targets):
        hid = torch.tanh(self.mix(self.embed(tokens)))
        return self.loss(self.head.weight, hid.flatten(0, 1), targets.flatten(), self.head.bias)


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyLM().double()
    tokens, targets = torch.randint(0, 17, (2, 6)), torch.randint(0, 17, (2, 6))
    explain = torch._dynamo.explain(model)(tokens, targets)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hid = torch.tanh(model.mix(model.embed(tokens))).flatten(0, 1)
    logits = model.head(hid)
    ref = TF.cross_entropy(logits, targets.flatten()) + 1e-3 * torch.logsumexp(logits, 1).pow(2).mean()
    ref.backward()
    close(loss, ref.detach(), torch.float64, "compiled loss")
    for got, p in zip(grads, model.parameters()):
        close(got, p.grad, torch.float64, "grad")


def test_meta_tensors_give_shapes():
    h, W = torch.empty(2, 3, 4, device="meta"), torch.empty(9, 4, device="meta")
    t = torch.empty(2, 3, dtype=torch.long, device="meta")
    loss, z_term = gt.fused_linear_cross_entropy(h, W, t, reduction="none", return_z_loss=True)
    assert loss.shape == z_term.shape == (2, 3)
    assert gt.fused_linear_cross_entropy(h, W, t).shape == ()


# ---------------------------------------------------------------------------------------------
# Bad input: torch's exception types (of F.cross_entropy(F.linear(...))), the argument named
# ---------------------------------------------------------------------------------------------

_h, _W, _t = torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 2, 3])


def _ref(h, W, t, b=None, ce_weight=None, **kw):
    return TF.cross_entropy(TF.linear(h, W, b), t, weight=ce_weight, **kw)


BAD = [
    ("target", lambda f: f(_h, _W, torch.tensor([0, 1, 2, 7]))),            # out of range: IndexError
    ("target", lambda f: f(_h, _W, torch.tensor([0, 1, 2, -3]))),
    ("target", lambda f: f(_h, _W, _t.float())),
    ("target", lambda f: f(_h, _W, _t.int())),
    ("target", lambda f: f(_h, _W, _t[:3])),                                 # batch size
    ("target", lambda f: f(_h, _W, _t.to("meta"))),                          # mixed devices
    ("input", lambda f: f(_h, torch.randn(7, 5), _t)),                       # hidden size
    ("input", lambda f: f(_h.long(), _W.long(), _t)),
    ("weight", lambda f: f(_h, _W.double(), _t)),
    ("bias", lambda f: f(_h, _W, _t, torch.randn(6))),
    ("bias", lambda f: f(_h, _W, _t, torch.randn(7).double())),
    ("ce_weight", lambda f: f(_h, _W, _t, ce_weight=torch.ones(6))),
    ("reduction", lambda f: f(_h, _W, _t, reduction="avg")),
    ("label_smoothing", lambda f: f(_h, _W, _t, label_smoothing=1.5)),
    ("ignore_index", lambda f: f(_h, _W, _t, ignore_index=1.5)),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_raises_like_torch(name, call):
    with pytest.raises(Exception) as theirs:
        call(_ref)
    with pytest.raises(theirs.type, match=name):
        call(gt.fused_linear_cross_entropy)


@pytest.mark.parametrize("kw,exc", [(dict(z_loss=-1.0), ValueError), (dict(softcap=0.0), ValueError),
                                    (dict(z_loss=torch.tensor(0.1)), TypeError), (dict(chunk_size=0), ValueError),
                                    (dict(chunk_size=2.5), TypeError)])
def test_bad_options_are_named(kw, exc):
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        gt.fused_linear_cross_entropy(_h, _W, _t, **kw)
    if name != "chunk_size":
        with pytest.raises(exc, match=name):
            gt.cross_entropy(torch.randn(4, 7), _t, **kw)


# ---------------------------------------------------------------------------------------------
# The kernel path: CPU tensors on the emulator (CUDA tensors on a GPU)
# ---------------------------------------------------------------------------------------------

def _kernel_parity(device, dtype):
    g = torch.Generator().manual_seed(3)
    h, W, t, b, w = problem(g, 10, 8, 9, dtype, ce_weight=True, ignore=True, device=device)
    h, W, b = (x.requires_grad_() for x in (h, W, b))
    opts = dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.1)
    loss = gt.fused_linear_cross_entropy(h, W, t, b, ce_weight=w, chunk_size=4, **opts)
    grads = torch.autograd.grad(loss, (h, W, b))
    ref = reference(h, W, t, b, w, **opts)
    assert loss.device == h.device and loss.dtype == dtype
    close(loss, ref[0], dtype, "loss")
    for name, got, want in zip(("dh", "dW", "dbias"), grads, ref[2:]):
        assert got.dtype == dtype
        close(got, want, dtype, name, factor=4.0)
    z = (torch.randn(6, 5, generator=g) * 3).to(dtype).to(device).requires_grad_()
    tz = torch.randint(0, 5, (6,), generator=g).to(device)
    loss = gt.cross_entropy(z, tz, **opts)
    (dz,) = torch.autograd.grad(loss, z)
    rl, rdz = R.softmax_cross_entropy(z.detach().double().cpu().numpy(), tz.cpu().numpy(), 1, label_smoothing=0.1,
                                      z_loss=1e-2, softcap=3.0)
    close(loss, rl, dtype, "ce loss")
    close(dz, rdz, dtype, "ce dz", factor=4.0)


def _deferred_bad_target(device):
    """The kernel path records an out-of-range target on the device: the call returns (no
    sync), gpu.check_errors() raises it; with eager checks the call raises torch's IndexError."""
    h, W = torch.randn(4, 6, device=device, requires_grad=True), torch.randn(7, 6, device=device)
    z = torch.randn(4, 7, device=device, requires_grad=True)
    bad = torch.tensor([0, 1, 9, 2], device=device)
    gpu.check_errors()
    for call in (lambda: gt.fused_linear_cross_entropy(h, W, bad), lambda: gt.cross_entropy(z, bad)):
        call().backward()
        with pytest.raises(ValueError, match="target"):
            gpu.check_errors()
        gpu.check_errors()                                      # cleared by the check
        previous = gpu.set_eager_checks(True)
        try:
            with pytest.raises(IndexError, match="target"):
                call()
        finally:
            gpu.set_eager_checks(previous)
            gpu.check_errors()


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_kernels_through_torch(dtype):
    with gpu.use_backend("emulate"):
        _kernel_parity("cpu", dtype)


@pytest.mark.kernel
def test_emulated_bad_target_is_deferred():
    with gpu.use_backend("emulate"):
        _deferred_bad_target("cpu")


def test_numpy_path_bad_target_raises_at_once():
    # the NumPy path checks targets in the call, with torch's IndexError
    with pytest.raises(IndexError, match="target"):
        gt.fused_linear_cross_entropy(_h, _W, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(IndexError, match="target"):
        gt.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 9, 2]), z_loss=1e-3)


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_tensors_match_reference(dtype):
    _cuda()
    _kernel_parity("cuda", dtype)


@pytest.mark.gpu
def test_cuda_bad_target_is_deferred_without_sync():
    _cuda()
    _deferred_bad_target("cuda")
    h = torch.randn(64, 32, device="cuda", requires_grad=True)
    W = torch.randn(100, 32, device="cuda", requires_grad=True)
    t = torch.randint(0, 100, (64,), device="cuda")
    z = torch.randn(64, 100, device="cuda", requires_grad=True)
    gt.fused_linear_cross_entropy(h, W, t).backward()          # warm: kernels compiled, workspaces made
    gt.cross_entropy(z, t).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                     # torch raises on any synchronizing call
    try:
        gt.fused_linear_cross_entropy(h, W, t, z_loss=1e-4).backward()
        gt.cross_entropy(z, t, z_loss=1e-4, softcap=30.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    gpu.check_errors()
