"""Batch norm with the residual add and ReLU fused, through PyTorch: `gpu.torch.batch_norm`'s
``residual``/``activation`` against torch's unfused ``relu(F.batch_norm(x) + r)`` (values, every
gradient, running statistics) in float64/float32/bfloat16 on every layout, gradcheck, torch.compile,
the `BatchNormAct*d` modules, and `gpu.torch.fuse` on a ResNet-18-shaped model.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402
from torch import nn  # noqa: E402

import gpu.torch as gt  # noqa: E402
from gpu._backend import BFLOAT16  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
_NP = {torch.float64: np.dtype(np.float64), torch.float32: np.dtype(np.float32), torch.bfloat16: BFLOAT16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: torch's thread pool on a loaded 2-core machine costs more than it gives."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _close(out, ref, dtype, what, factor=1.0):
    """Relative error of out against ref (both converted to float64) within the dtype's tolerance."""
    if dtype == torch.bfloat16 and BFLOAT16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    err = rel_err(out.detach().double().numpy(), ref.detach().double().numpy())
    tol = TOL[_NP[dtype]] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def _unfused(x, rm, rv, w, b, training, r, act):
    y = TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if r is not None:
        y = y + r
    return torch.relu(y) if act == "relu" else y


# ---------------------------------------------------------------------------------------------
# The functional form against torch's composition
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "nc": ((37, 5), None),                       # 2-D: rows not a multiple of anything
    "ncl": ((6, 3, 7), None),                    # 1-d batch norm over (N, L)
    "nchw": ((4, 6, 5, 3), None),                # odd spatial sizes
    "nhwc": ((4, 6, 5, 3), torch.channels_last),  # the same, channels-last
    "ncdhw": ((2, 3, 3, 2, 4), torch.channels_last_3d),
}


CASES = ([(dt, layout, training, True, "relu") for dt in DTYPES for layout in LAYOUTS for training in (True, False)]
         # the epilogue's two halves alone
         + [(torch.float32, "nhwc", training, residual, act) for training in (True, False)
            for residual, act in ((False, "relu"), (True, None))])


@pytest.mark.parametrize("dtype,layout,training,residual,act", CASES, ids=str)
def test_functional_matches_torch(dtype, layout, training, residual, act):
    shape, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(1)
    C = shape[1]
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype    # torch's mixed type for bfloat16
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w, b = torch.rand(C, generator=g).to(pdt) + 0.5, torch.randn(C, generator=g).to(pdt)
    rm, rv = torch.randn(C, generator=g).to(pdt), torch.rand(C, generator=g).to(pdt) + 0.5
    dy = torch.randn(shape, generator=g).to(dtype)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    refs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = gt.batch_norm(leaves[0], rm1, rv1, leaves[1], leaves[2], training, residual=leaves[3], activation=act)
    y_ref = _unfused(refs[0], rm2, rv2, refs[1], refs[2], training, refs[3], act)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    _close(y, y_ref, dtype, "y")
    _close(rm1, rm2, dtype, "running_mean")
    _close(rv1, rv2, dtype, "running_var")
    y.backward(dy)
    y_ref.backward(dy)
    for name, a, e in zip(("x", "weight", "bias", "residual"), leaves, refs):
        if a is not None:
            # the relu mask of a bfloat16 y may differ where bn(x) + r rounds to 0: a loose factor
            _close(a.grad, e.grad, dtype, f"grad of {name}", factor=4 if dtype == torch.bfloat16 else 10)


@pytest.mark.kernel
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_emulated_kernels_through_torch(layout):
    # the CUDA kernels' epilogue (on the emulator) through gpu.torch: x, the residual, y and dy
    # passed as the kernels' views of the tensors, in training and evaluation
    import gpu
    for training in (True, False):
        with gpu.use_backend("emulate"):
            test_functional_matches_torch(torch.float32, layout, training, True, "relu")


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    r = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for training in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, w, b, r: gt.batch_norm(x, rm, rv, w, b, training, 0.0, residual=r, activation="relu"),
            (x, w, b, r))


def test_bad_arguments_name_the_argument():
    x, rm, rv = torch.randn(4, 3, 2, 2), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="activation"):
        gt.batch_norm(x, rm, rv, training=True, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        gt.batch_norm(x, rm, rv, training=True, residual=torch.randn(4, 3, 2, 1))
    with pytest.raises(TypeError, match="residual"):
        gt.batch_norm(x, rm, rv, training=True, residual=torch.randn(4, 3, 2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual"):
        gt.batch_norm(x, rm, rv, training=True, residual=np.zeros((4, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="activation"):
        gt.BatchNormAct2d(3, activation="tanh")


def test_residual_may_alias_the_input():
    # relu(bn(x) + x): residual and input are one tensor
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = gt.batch_norm(x, None, None, training=True, residual=x, activation="relu")
    x2 = x.detach().clone().requires_grad_()
    y_ref = _unfused(x2, None, None, None, None, True, x2, "relu")
    _close(y, y_ref, torch.float64, "y")
    y.sum().backward()
    y_ref.sum().backward()
    _close(x.grad, x2.grad, torch.float64, "grad", factor=100)


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------

def test_modules_load_torch_checkpoints_and_match():
    torch.manual_seed(4)
    ref = nn.BatchNorm2d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ref(torch.randn(8, 5, 3, 3))            # running statistics that are not the defaults
    bn = gt.BatchNormAct2d(5)
    bn.load_state_dict(ref.state_dict())
    assert list(bn.state_dict()) == list(ref.state_dict())
    nn.BatchNorm2d(5).load_state_dict(bn.state_dict())
    assert "activation='relu'" in repr(bn)
    x, r = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    for mode in (True, False):
        bn.train(mode)
        ref.train(mode)
        _close(bn(x, r), torch.relu(ref(x) + r), torch.float32, f"training={mode}", factor=10)
        _close(bn(x), torch.relu(ref(x)), torch.float32, f"no residual, training={mode}", factor=10)
    _close(bn.running_var, ref.running_var, torch.float32, "running_var")
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
    plain = gt.BatchNormAct1d(3, activation=None)
    x1, r1 = torch.randn(9, 3), torch.randn(9, 3)
    _close(plain(x1, r1), nn.BatchNorm1d(3)(x1) + r1, torch.float32, "1d, no activation", factor=10)
    assert gt.BatchNormAct3d(2)(torch.randn(2, 2, 2, 2, 2)).min() >= 0


# ---------------------------------------------------------------------------------------------
# fuse: a ResNet-18-shaped model
# ---------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu, conv-bn, += identity (downsampled when the shape
    changes), relu; in-place ReLU and in-place add as torchvision writes them."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    """ResNet-18's structure (stem, four stages of two BasicBlocks, the last three downsampling),
    at widths small enough for an 8x8 input."""

    def __init__(self, width=4, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 2 * width, 2 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(TF.adaptive_avg_pool2d(x, 1), 1))


def _fused_kinds(gm):
    return sorted(type(m).__name__ for m in gm.modules() if "BatchNorm" in type(m).__name__)


def test_fuse_resnet18_structure():
    gm = gt.fuse(ResNet18())
    kinds = _fused_kinds(gm)
    # stem + 8 blocks x 2 batch norms fused; the 3 downsample batch norms feed the add that bn2 fused
    assert kinds.count("BatchNormAct2d") == 17 and kinds.count("BatchNorm2d") == 3, kinds
    # every ReLU and every residual add went into a fused call
    left = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU))]
    assert left == [TF.adaptive_avg_pool2d, torch.flatten], left


def _errors(pairs):
    """(fused's, torch's) relative errors against the float64 truth, for (what, out, ref, truth)."""
    if BFLOAT16 is None and any(o.dtype == torch.bfloat16 for _, o, _, _ in pairs):
        pytest.skip("bfloat16 needs ml_dtypes")
    e = lambda a, b: rel_err(a.detach().double().numpy(), b.detach().double().numpy())  # noqa: E731
    return [(what, e(o, t), e(r, t)) for what, o, r, t in pairs]


def _no_worse(pairs, dtype, factor):
    """The fused model is within the dtype's tolerance of the float64 truth, or no further from it
    than torch's own unfused model in the same dtype. bfloat16: on average over the tensors, as a
    ResNet's bfloat16 gradients are tens of percent off the truth for either model (with a batch
    of 6, the last stage normalizes 6 values per channel) and each tensor's error is chance."""
    errs = _errors(pairs)
    tol = TOL[_NP[dtype]] * factor
    if dtype == torch.bfloat16:
        mean, mean_ref = np.mean([e for _, e, _ in errs]), np.mean([r for _, _, r in errs])
        assert mean <= 2 * mean_ref + tol, f"mean error {mean:.3g}, torch's own {mean_ref:.3g}: {errs}"
        return
    for what, e, r in errs:
        assert e <= 2 * r + tol, f"{what}: error {e:.3g}, torch's own {r:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fuse_resnet18_matches_in_train_and_eval(dtype, fmt):
    torch.manual_seed(5)
    model = ResNet18().to(dtype=dtype, memory_format=fmt)
    ref, truth = copy.deepcopy(model), copy.deepcopy(model).double()
    fused = gt.fuse(model)
    x = torch.randn(6, 1, 8, 8).to(dtype).contiguous(memory_format=fmt)
    t = torch.randint(0, 10, (6,))
    factor = {torch.float64: 1e3, torch.float32: 1e2, torch.bfloat16: 3.0}[dtype]
    for step in range(2):
        for m in (fused, ref, truth):
            m.train()
            m.zero_grad()
        y, y_ref, y_64 = fused(x), ref(x), truth(x.double())
        _no_worse([(f"train output, step {step}", y, y_ref, y_64)], dtype, factor)
        for out in (y, y_ref, y_64):
            TF.cross_entropy(out.double(), t).backward()
        _no_worse([(f"grad of {name}", p.grad, q.grad, p64.grad) for (name, p), q, p64
                   in zip(model.named_parameters(), ref.parameters(), truth.parameters())], dtype, factor)
        _no_worse([(name, b, c, b64) for (name, b), c, b64 in zip(model.named_buffers(), ref.buffers(),
                                                                   truth.buffers()) if b.is_floating_point()],
                  dtype, factor)
        for (name, b), c in zip(model.named_buffers(), ref.buffers()):
            if not b.is_floating_point():
                assert int(b) == int(c), name
    for m in (fused, ref, truth):
        m.eval()
    with torch.no_grad():
        _no_worse([("eval output", fused(x), ref(x), truth(x.double()))], dtype, factor)


def test_fused_model_compiles_fullgraph():
    # a fused BasicBlock (bn1 + relu; bn2 + the downsampled identity + relu) under
    # torch.compile(fullgraph=True): no graph break, the unfused model's output and gradients
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = BasicBlock(3, 4, stride=2).double()
    ref = copy.deepcopy(model)
    fused = gt.fuse(model)
    assert _fused_kinds(fused) == ["BatchNorm2d", "BatchNormAct2d", "BatchNormAct2d"]
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    y = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
    y_ref = ref(x)
    _close(y, y_ref, torch.float64, "y", factor=100)
    y.sum().backward()
    y_ref.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        _close(p.grad, q.grad, torch.float64, f"grad of {name}", factor=1e3)


def test_fuse_keeps_the_models_tensors_and_optimizer():
    torch.manual_seed(6)
    model = ResNet18().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = gt.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    for (n, a), b in zip(fused.state_dict(keep_vars=True).items(), model.state_dict(keep_vars=True).values()):
        assert a is b, n
    before = model.layer1[0].bn1.weight.detach().clone()
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    TF.cross_entropy(fused(x), t).backward()
    opt.step()
    assert not torch.equal(model.layer1[0].bn1.weight, before)
    assert fused.get_submodule("layer1.0.bn1").weight is model.layer1[0].bn1.weight


class _Rules(nn.Module):
    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(9))
        self.act = nn.ReLU()

    def forward(self, x, r):
        b = self.bns
        y0 = TF.relu(b[0](x), inplace=True)              # fused: F.relu in place
        y1 = torch.relu(b[1](x))                         # fused: torch.relu
        y2 = b[2](x).relu_()                             # fused: the in-place method
        h = b[3](x)
        y3 = self.act(h) + h                             # two users: stays
        y4 = self.act(b[4](x) + 1.0)                     # a scalar operand: stays
        y5 = self.act(r + b[5](x))                       # fused: the residual first
        y6 = torch.relu(b[6](x) + r[:, :1])              # a broadcast operand: fused, added unfused
        y7 = self.act(b[7](x)) + torch.sigmoid(b[7](x))  # one module, two calls, one not fusable: stays
        y8 = self.act(b[8](x) - r)                       # not an add: stays
        return y0 + y1 + y2 + y3 + y4 + y5 + y6 + y7 + y8


def test_fuse_rules():
    torch.manual_seed(7)
    model = _Rules().double()
    gm = gt.fuse(model)
    kinds = {i: type(gm.get_submodule(f"bns.{i}")).__name__ for i in range(9)}
    fused = {i for i, k in kinds.items() if k == "BatchNormAct2d"}
    assert fused == {0, 1, 2, 5, 6}, kinds
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    r = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        gm.train(mode)
        ref.train(mode)
        _close(gm(x, r), ref(x, r), torch.float64, f"training={mode}", factor=1e3)
    for (n, a), b in zip(model.named_buffers(), ref.buffers()):
        _close(a.double(), b.double(), torch.float64, n, factor=1e3)


def test_fuse_sync_batch_norm_runs_plain_without_a_process_group():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3), nn.ReLU(inplace=True),
                          gt.SyncBatchNorm(3), nn.ReLU()).double()
    ref = nn.Sequential(*(m for m in copy.deepcopy(model)))
    ref[1] = nn.BatchNorm2d(3).double()                  # what torch's runs without a group
    ref[1].load_state_dict(model[1].state_dict())
    gm = gt.fuse(model)
    assert [type(gm.get_submodule(n)).__name__ for n in ("1", "3")] == ["SyncBatchNormAct"] * 2
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for mode in (True, False):
        gm.train(mode)
        ref.train(mode)
        _close(gm(x), ref(x), torch.float64, f"training={mode}", factor=1e3)
    _close(model[1].running_var, ref[1].running_var, torch.float64, "running_var", factor=1e3)


def test_sync_batch_norm_fused_over_a_group(tmp_path):
    # the synchronized fused op (its allgather and all-reduce) on a gloo group of one rank in this
    # process, against torch's unfused composition
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(9)
        x = torch.randn(6, 3, 4, 2, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        r = torch.randn(6, 3, 4, 2, generator=g, dtype=torch.float64)
        w, b = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
        refs = [t.clone().requires_grad_() for t in (x, w, b, r)]
        rm1, rv1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        rm2, rv2 = rm1.clone(), rv1.clone()
        y = gt.sync_batch_norm(leaves[0], rm1, rv1, leaves[1], leaves[2], residual=leaves[3], activation="relu")
        y_ref = _unfused(refs[0], rm2, rv2, refs[1], refs[2], True, refs[3], "relu")
        _close(y, y_ref, torch.float64, "y", factor=10)
        _close(rv1, rv2, torch.float64, "running_var", factor=10)
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(dy)
        y_ref.backward(dy)
        for name, a, e in zip(("x", "weight", "bias", "residual"), leaves, refs):
            _close(a.grad, e.grad, torch.float64, f"grad of {name}", factor=100)
        with pytest.raises(ValueError, match="activation"):
            gt.sync_batch_norm(x, None, None, activation="sigmoid")
    finally:
        dist.destroy_process_group()


def test_gpu_train_resnet_fused_curve_equals_unfused(tmp_path, capsys):
    # gpu-train's small ResNet on the digits, fused and unfused from the same start: in float64
    # the two loss curves agree to rounding, and both times per epoch are printed
    import json
    from gpu.train import main
    out = tmp_path / "run.json"
    assert main(["--framework", "torch", "--model", "resnet", "--fuse", "--torch-dtype", "float64", "--epochs", "1",
                 "--batch-size", "64", "--max-steps", "4", "--quiet", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["with BN"]
    assert run["steps"] == 4 and run["fusion"]["max_loss_difference"] < 1e-10, run
    assert run["fusion"]["fused_s_per_epoch"] > 0 and run["fusion"]["unfused_s_per_epoch"] > 0
    assert "s per epoch unfused" in capsys.readouterr().err
