"""gpu.nn: layers, the full-network gradient check, optimizers, checkpoints, data, training loop.

Tiny networks and a few steps each: the whole file runs in seconds on a 2-core CPU. The last two
tests train the same tiny net on the kernel path (emulator, then GPU) and compare loss curves
with the NumPy path step by step.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest

import gpu
from gpu.nn import (SGD, Adam, BatchNorm, Linear, Momentum, Parameter, RMSprop, Sequential, Sigmoid,
                    SoftmaxCrossEntropy, Standardize, check_dataset, evaluate,
                    exponential_decay, fit, gradient_check, inverse_time_decay, load_dataset,
                    load_model, minibatches, mlp, save_model, synthetic, train_val_split)
from gpu.nn import trainer
from gpu.nn.data import load_npz
from gpu.nn.trainer import History


def tiny_data(seed: int = 0, n: int = 12, features: int = 5, classes: int = 3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), np.arange(n) % classes


# ---------------------------------------------------------------------------------------------
# Gradients: backprop through every layer against central differences in float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
def test_full_network_gradient_check(activation, batch_norm):
    x, y = tiny_data()
    # a float64 copy of what the CLI trains: Standardize -> (Linear -> BN -> act) x 2 -> Linear
    model = Sequential([Standardize(5).fit(x), *mlp([5, 6, 4, 3], activation=activation,
                                                   batch_norm=batch_norm, seed=1).layers])
    model.to(np, np.float64)
    errors = gradient_check(model, SoftmaxCrossEntropy(), x, y)
    expected = {"input"} | set(model.parameters())
    assert set(errors) == expected
    assert max(errors.values()) < 1e-6, errors


def test_gradient_check_with_label_smoothing_and_running_stats_restored():
    x, y = tiny_data(seed=2)
    model = mlp([5, 4, 3], activation="tanh", seed=3).to(np, np.float64)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    errors = gradient_check(model, SoftmaxCrossEntropy(label_smoothing=0.1), x, y)
    assert max(errors.values()) < 1e-6, errors
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_gradient_check_catches_a_wrong_backward():
    class BrokenSigmoid(Sigmoid):
        def backward(self, dy):
            return dy * self._y  # the (1 - y) factor forgotten

    x, y = tiny_data()
    model = Sequential([Linear(5, 4, rng=np.random.default_rng(0)), BrokenSigmoid(),
                        Linear(4, 3, rng=np.random.default_rng(1))]).to(np, np.float64)
    assert gradient_check(model, SoftmaxCrossEntropy(), x, y)["0.W"] > 1e-2


def test_gradient_check_needs_float64():
    with pytest.raises(TypeError, match="float64"):
        gradient_check(mlp([5, 3]), SoftmaxCrossEntropy(), *tiny_data())


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init, fan", [("he", 400), ("xavier", 250)])
def test_linear_init_scale(init, fan):
    layer = Linear(400, 100, init=init, rng=np.random.default_rng(0))
    assert layer.W.data.shape == (400, 100) and layer.W.data.dtype == np.float32
    np.testing.assert_allclose(layer.W.data.std(), np.sqrt(2 / fan), rtol=0.02)
    np.testing.assert_array_equal(layer.b.data, 0)


def test_hidden_linear_has_no_bias_before_batch_norm():
    with_bn, without = mlp([8, 7, 6, 3], seed=4), mlp([8, 7, 6, 3], batch_norm=False, seed=4)
    assert [type(l).__name__ for l in with_bn.layers] == [
        "Linear", "BatchNorm", "ReLU", "Linear", "BatchNorm", "ReLU", "Linear"]
    assert set(with_bn.parameters()) == {"0.W", "1.gamma", "1.beta", "3.W", "4.gamma", "4.beta",
                                         "6.W", "6.b"}
    assert set(without.parameters()) == {"0.W", "0.b", "2.W", "2.b", "4.W", "4.b"}
    # one seed, one initialization: the weights match layer for layer
    w_bn = [l.W.data for l in with_bn.layers if isinstance(l, Linear)]
    w_plain = [l.W.data for l in without.layers if isinstance(l, Linear)]
    for a, b in zip(w_bn, w_plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_train_then_eval_uses_running_stats():
    rng = np.random.default_rng(5)
    bn = BatchNorm(4, momentum=0.5)
    batches = [(rng.standard_normal((16, 4)) * 3 + 2).astype(np.float32) for _ in range(3)]
    r_mean, r_var = np.zeros(4), np.ones(4)
    for xb in batches:
        y = bn.forward(xb)
        np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
        r_mean = 0.5 * r_mean + 0.5 * xb.mean(axis=0)
        r_var = 0.5 * r_var + 0.5 * xb.var(axis=0, ddof=1)  # unbiased, as PyTorch
    np.testing.assert_allclose(bn.running_mean, r_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, r_var, rtol=1e-5)
    bn.training = False
    x = batches[0]
    np.testing.assert_allclose(bn.forward(x), (x - r_mean) / np.sqrt(r_var + 1e-5), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, r_mean, rtol=1e-5)  # eval leaves them alone


@pytest.mark.parametrize("shape, axis, features", [
    ((6, 10), 1, 6),              # the seed's Z[l]: (n_units, m), statistics over examples
    ((4, 3, 5), (0, 2), 3),       # (N, C, L): per channel
])
def test_batchnorm_any_axis(shape, axis, features):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape)
    bn = BatchNorm(features, axis=axis, dtype=np.float64)
    bn.gamma.data[...] = rng.standard_normal(features)
    y = bn.forward(x)
    ref, _, _ = gpu.batch_norm_forward(x, bn.gamma.data, bn.beta.data, axis=axis)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    dx = bn.backward(np.ones_like(x))
    assert dx.shape == x.shape and bn.gamma.grad.shape == (features,)
    assert bn.running_mean.shape == (features,)


def test_sigmoid_saturates_without_overflow():
    with np.errstate(all="raise"):
        y = Sigmoid().forward(np.array([-1e4, 0.0, 1e4], np.float32))
    np.testing.assert_array_equal(y, [0, 0.5, 1])


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        mlp([4, 3], activation="gelu")
    with pytest.raises(ValueError, match="sizes"):
        mlp([4])


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, first_step", [
    (lambda ps: SGD(ps, lr=0.1), lambda g: 0.1 * g),
    (lambda ps: Momentum(ps, lr=0.1, beta=0.9), lambda g: 0.1 * 0.1 * g),
    (lambda ps: RMSprop(ps, lr=0.01, beta=0.9), lambda g: 0.01 * np.sign(g) / np.sqrt(0.1)),
    # bias correction: Adam's first step is lr * sign(g) whatever the scale of g
    (lambda ps: Adam(ps, lr=0.01), lambda g: 0.01 * np.sign(g)),
], ids=["sgd", "momentum", "rmsprop", "adam"])
def test_optimizer_first_step(make, first_step):
    g = np.array([0.5, -2.0, 1e-3])
    p = Parameter(np.ones(3), grad=g)
    make([p]).step()
    np.testing.assert_allclose(1.0 - p.data, first_step(g), rtol=1e-4)


@pytest.mark.parametrize("opt", [SGD, Momentum, RMSprop, Adam])
def test_optimizers_reduce_the_training_loss(opt):
    data = synthetic(n=200, features=6, classes=3, seed=1)
    X, y = data.X.astype(np.float32), data.y
    model, head = mlp([6, 16, 3], seed=0), SoftmaxCrossEntropy()
    lr = {SGD: 0.1, Momentum: 0.1, RMSprop: 1e-2, Adam: 1e-2}[opt]
    hist = fit(model, head, opt(model.parameters().values(), lr=lr), (X, y), epochs=10,
               batch_size=32, progress=False)
    assert np.mean(hist.step_loss[-5:]) < 0.5 * np.mean(hist.step_loss[:5])


def test_learning_rate_schedules():
    assert [inverse_time_decay(1.0, 0.5)(e) for e in range(3)] == [1.0, 1 / 1.5, 0.5]
    assert [exponential_decay(1.0, 0.5)(e) for e in range(3)] == [1.0, 0.5, 0.25]
    data = synthetic(n=64, features=4, classes=2, seed=0)
    model = mlp([4, 8, 2])
    opt = SGD(model.parameters().values(), lr=0.1)
    hist = fit(model, SoftmaxCrossEntropy(), opt, (data.X.astype(np.float32), data.y),
               epochs=3, batch_size=16, schedule=inverse_time_decay(0.1, 1.0), progress=False)
    np.testing.assert_allclose([e["lr"] for e in hist.epochs], [0.1, 0.05, 0.1 / 3])


def test_step_without_backward_is_an_error():
    with pytest.raises(RuntimeError, match="backward"):
        SGD(mlp([4, 2]).parameters().values(), lr=0.1).step()


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_gives_identical_eval_predictions(tmp_path, dtype):
    data = synthetic(n=120, features=6, classes=3, seed=2)
    X = data.X.astype(dtype)
    model = Sequential([Standardize(6).fit(X), *mlp([6, 8, 8, 3], seed=1).layers]).to(dtype=dtype)
    fit(model, SoftmaxCrossEntropy(), Adam(model.parameters().values()), (X, data.y), epochs=2,
        batch_size=16, progress=False)  # running stats away from their initial 0 and 1
    path = tmp_path / "model.npz"
    save_model(str(path), model)
    loaded = load_model(str(path))
    assert loaded.config() == model.config()
    model.eval(), loaded.eval()
    out, again = model.forward(X), loaded.forward(X)
    assert again.dtype == dtype
    np.testing.assert_array_equal(out, again)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v, err_msg=k)


def test_load_rejects_a_dataset_file(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((2, 2)), y=np.zeros(2, int))
    with pytest.raises(ValueError, match="not a saved model"):
        load_model(str(path))


def test_load_state_dict_checks_names_and_shapes():
    model = mlp([4, 5, 3])
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing"):
        model.load_state_dict({k: v for k, v in state.items() if k != "0.W"})
    state["0.W"] = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"0\.W.*shape"):
        model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Data: checks, split, mini-batches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("X, y, match", [
    (np.zeros((4, 2)), np.array([0, 1, 2, -1]), r"outside 0\.\.2"),
    (np.zeros((4, 2)), np.array([0, 1, 0.5, 1]), "non-integer"),
    (np.array([[0.0, np.nan], [1, 1], [2, 2]]), np.array([0, 1, 0]), "NaN.*example 0"),
    (np.zeros((4, 2)), np.array([0, 1, 0]), "one label per example"),
    (np.zeros(4), np.array([0, 1, 0, 1]), "examples, features"),
    (np.zeros((4, 2)), np.zeros(4, int), "at least 2 classes"),
])
def test_check_dataset_rejects(X, y, match):
    with pytest.raises(ValueError, match=match):
        check_dataset("d", X, y)


def test_check_dataset_declared_classes_and_images():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        check_dataset("d", np.zeros((3, 2)), np.array([0, 1, 3]), num_classes=3)
    d = check_dataset("d", np.zeros((3, 4, 4)), np.array([0.0, 1.0, 2.0]))  # images, float labels
    assert d.X.shape == (3, 16) and d.y.dtype == np.int64 and d.num_classes == 3


def test_npz_without_X_y(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"\['inputs', 'labels'\].*'X'.*'y'"):
        load_npz(str(path))
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("no-such-dataset")


def test_split_and_batches_are_seeded_and_cover_everything():
    data = synthetic(n=101, features=3, classes=2, seed=0)
    (Xt, yt), (Xv, yv) = train_val_split(data, 0.2, seed=7)
    (Xt2, _), _ = train_val_split(data, 0.2, seed=7)
    assert len(yv) == 20 and len(yt) == 81
    np.testing.assert_array_equal(Xt, Xt2)
    batches = list(minibatches(81, 16, np.random.default_rng(3)))
    # 81 = 5 * 16 + 1: the lone last example joins the batch before it (BN cannot take 1)
    assert [len(b) for b in batches] == [16, 16, 16, 16, 17]
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(81))
    again = list(minibatches(81, 16, np.random.default_rng(3)))
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))
    assert [len(b) for b in minibatches(3, 1, np.random.default_rng(0))] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------

def test_batch_size_one_with_batch_norm_fails_before_training():
    X, y = tiny_data()
    model = mlp([5, 4, 3])
    before = model.state_dict()["0.W"].copy()
    with pytest.raises(ValueError, match="batch_size: 1 with batch norm"):
        fit(model, SoftmaxCrossEntropy(), SGD(model.parameters().values(), lr=0.1),
            (X.astype(np.float32), y), epochs=1, batch_size=1, progress=False)
    np.testing.assert_array_equal(model.state_dict()["0.W"], before)
    plain = mlp([5, 4, 3], batch_norm=False)  # without BN, one example per step is fine
    fit(plain, SoftmaxCrossEntropy(), SGD(plain.parameters().values(), lr=0.1),
        (X.astype(np.float32), y), epochs=1, batch_size=1, progress=False)


def test_fit_is_deterministic_and_records_validation():
    data = synthetic(n=150, features=5, classes=3, seed=4)
    (Xt, yt), (Xv, yv) = train_val_split(data, 0.2, seed=0)
    curves = []
    for _ in range(2):
        model = mlp([5, 8, 3], seed=2)
        hist = fit(model, SoftmaxCrossEntropy(), Adam(model.parameters().values(), lr=1e-2),
                   (Xt.astype(np.float32), yt), (Xv.astype(np.float32), yv), epochs=3,
                   batch_size=20, seed=5, eval_every=4, progress=False)
        curves.append(hist.step_loss)
    assert curves[0] == curves[1]
    assert len(hist.step_loss) == 18 and hist.eval_step == [0, 4, 6, 8, 12, 16, 18]
    assert hist.val_acc[-1] == evaluate(model, SoftmaxCrossEntropy(), Xv.astype(np.float32), yv)[1]
    assert hist.steps_to(0.0) == 0 and hist.steps_to(1.01) is None
    assert model.training  # evaluate restores the mode


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit_two_epochs() -> None:
    data = synthetic(n=64, features=4, classes=2, seed=0)
    model = mlp([4, 8, 2])
    fit(model, SoftmaxCrossEntropy(), Adam(model.parameters().values()),
        (data.X.astype(np.float32), data.y), (data.X.astype(np.float32), data.y), epochs=2,
        batch_size=16, desc="[t] ")


def test_progress_on_a_terminal_is_a_bar_with_loss_and_accuracy(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    _fit_two_epochs()
    err = sys.stderr.getvalue()
    assert "[t] epoch 2/2" in err and "batch/s" in err
    assert "loss=" in err and "acc=" in err and "val_acc=" in err


def test_piped_progress_is_one_line_per_epoch(capsys):
    _fit_two_epochs()   # capsys's stderr is not a terminal, as when piped
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[t] epoch 1/2", "[t] epoch 2/2"], lines
    assert all("loss=" in line and " acc=" in line and "val_acc=" in line for line in lines)


def test_progress_without_tqdm_is_one_line_per_epoch(monkeypatch):
    monkeypatch.setattr(trainer, "_tqdm", lambda: None)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    _fit_two_epochs()
    assert len(sys.stderr.getvalue().splitlines()) == 2


def test_diverged_names_the_step_or_the_epoch():
    hist = History(step_loss=[2.3, 1.0, 0.5], epochs=[{"epoch": 1, "train_loss": 1.27}])
    assert trainer.diverged(hist) is None
    hist = History(step_loss=[2.3, 1e9, 1e10], epochs=[{"epoch": 1, "train_loss": 3.7e9}])
    assert trainer.diverged(hist) == "the mean training loss of epoch 1 is 3.7e+09, against 2.3 at the first step"
    hist = History(step_loss=[2.3, float("nan")], epochs=[{"epoch": 1, "train_loss": float("nan")}])
    assert trainer.diverged(hist) == "the training loss is nan at step 2"


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no-bn"])
def test_training_matches_pytorch_step_for_step(batch_norm):
    """An independent oracle: torch.nn with the same initial weights and the same batches."""
    torch = pytest.importorskip("torch")
    data = synthetic(n=120, features=6, classes=3, seed=5)
    X = data.X.astype(np.float32)
    model = mlp([6, 16, 16, 3], activation="sigmoid", batch_norm=batch_norm, seed=3)
    modules = []
    for layer in model.layers:
        if isinstance(layer, Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.b is not None)
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(layer.W.data.T.copy()))
                if layer.b is not None:
                    t.bias.zero_()
            modules.append(t)
        elif isinstance(layer, BatchNorm):
            modules.append(torch.nn.BatchNorm1d(layer.num_features[0]))
        else:
            modules.append(torch.nn.Sigmoid())
    net = torch.nn.Sequential(*modules)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    expected = []
    for idx in minibatches(len(X), 20, np.random.default_rng(0)):  # fit's batches for seed 0
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(X[idx])),
                                                 torch.from_numpy(data.y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    hist = fit(model, SoftmaxCrossEntropy(), SGD(model.parameters().values(), lr=0.5),
               (X, data.y), epochs=1, batch_size=20, seed=0, progress=False)
    np.testing.assert_allclose(hist.step_loss, expected, rtol=1e-5)
    if batch_norm:
        np.testing.assert_allclose(model.layers[1].running_var, modules[1].running_var.numpy(),
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The kernel path: the same tiny net on the emulator and on a GPU, against the NumPy path
# ---------------------------------------------------------------------------------------------

def _loss_curve(xp, steps: int = 5) -> list[float]:
    """Training losses of the first `steps` steps of a tiny BN net, with arrays on xp."""
    data = synthetic(n=96, features=8, classes=4, seed=3)
    model = mlp([8, 16, 16, 4], activation="tanh", seed=0).to(xp)
    X, y = xp.asarray(data.X.astype(np.float32)), xp.asarray(data.y)
    hist = fit(model, SoftmaxCrossEntropy(), Adam(model.parameters().values(), lr=1e-2),
               (X, y), epochs=2, batch_size=32, max_steps=steps, progress=False)
    assert len(hist.step_loss) == steps
    return hist.step_loss


# Float32 rounding: the kernels sum in another order than NumPy, so each step's loss (~1) may
# differ by some ulps (2^-23 ~ 1.2e-7) and Adam amplifies them a little over five steps; a
# real bug (a wrong gradient, a missed running-stat update) moves the curve by 1e-3 or more.
CURVE_RTOL = 2e-5


@pytest.mark.kernel
def test_loss_curve_on_the_emulator_matches_numpy():
    reference = _loss_curve(np)
    try:
        with gpu.use_backend("emulate"):
            emulated = _loss_curve(np)
    except NotImplementedError as e:
        pytest.skip(f"no kernel yet: {e}")
    np.testing.assert_allclose(emulated, reference, rtol=CURVE_RTOL)


@pytest.mark.gpu  # skipped without a GPU (conftest)
def test_loss_curve_on_the_gpu_matches_numpy():
    import cupy
    np.testing.assert_allclose(_loss_curve(cupy), _loss_curve(np), rtol=CURVE_RTOL)
