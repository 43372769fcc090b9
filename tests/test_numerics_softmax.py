"""Torch-parity corner cases of the softmax family, on the NumPy path and the kernels (emulator).

Each case states PyTorch's answer (checked against torch 2.x CPU where torch is installed; the
expectations are written out so that the tests run without it) and this library's, which is the
same unless a comment says why not. The README's "Corner cases" table lists them.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import gpu
from gpu import _cpu
from gpu.bench import reference as ref
from conftest import assert_close, random, rel_err, to_numpy


def _torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        pytest.skip("torch is not installed")
    return torch, F


def _torch_ce(z, target, *, weight=None, reduction="mean", **kw):
    """(loss, dz) of torch's F.cross_entropy on float64 copies, classes on axis 1 (dz of loss.sum())."""
    torch, F = _torch()
    zt = torch.tensor(np.asarray(z, np.float64), requires_grad=True)
    tt = torch.tensor(np.asarray(target, np.float64 if np.asarray(target).dtype.kind == "f" else np.int64))
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.cross_entropy(zt, tt, weight=wt, reduction=reduction, **kw)
    loss.sum().backward()
    return loss.detach().numpy(), zt.grad.numpy()


def _ce(backend, z, target, **kw):
    loss, dz = backend.call(gpu.softmax_cross_entropy, z, target, return_grad=True, **kw)
    return to_numpy(loss).astype(np.float64), to_numpy(dz).astype(np.float64)


def _same_nan_pattern(out, want):
    """Equal where want is finite (to float32 rounding), NaN exactly where want is NaN."""
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    assert out.shape == want.shape
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_allclose(out[~np.isnan(want)], want[~np.isnan(want)], rtol=2e-5, atol=1e-7)


Z = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Class weights that sum to 0 over the (non-ignored) targets
# ---------------------------------------------------------------------------------------------

def _zero_weight_cases():
    # (target, weight, expected gradient rows that are NaN): torch divides by the summed target
    # weight, 0, so 'mean' is 0/0 = NaN and each non-ignored row's gradient is w_t * (1/0) = NaN;
    # an ignored row's gradient stays 0 (torch skips it).
    return [
        (np.array([0, 1, 2, 3]), np.zeros(5, np.float32), [True] * 4),              # all weights 0
        (np.array([0, -100, 2, -100]), np.zeros(5, np.float32), [True, False, True, False]),  # mixed
        (np.array([0, 1, 2, 3]), np.array([0, 0, 0, 0, 1], np.float32), [True] * 4),  # targets' weights 0
    ]


@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["ls0", "ls0.1"])
@pytest.mark.parametrize("case", range(3), ids=["all-zero", "zero-and-ignored", "targets-zero"])
def test_zero_target_weight_mean_is_nan_with_nan_gradient(backend, case, ls):
    target, weight, nan_rows = _zero_weight_cases()[case]
    loss, dz = _ce(backend, Z, target, weight=weight, label_smoothing=ls)
    assert np.isnan(loss)
    np.testing.assert_array_equal(np.isnan(dz).all(axis=1), nan_rows)
    np.testing.assert_array_equal(dz[~np.array(nan_rows)], 0)
    # the backward alone agrees (its own entry point, dloss scaled)
    dz2 = to_numpy(backend.call(gpu.softmax_cross_entropy_backward, Z, target, 2.0, weight=weight,
                                label_smoothing=ls)).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(dz2), np.isnan(dz))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_zero_weights_sum_and_none_are_zero(backend, reduction):
    # no division: the losses and the gradient are 0, as in torch
    loss, dz = _ce(backend, Z, np.array([0, 1, 2, 3]), weight=np.zeros(5, np.float32), reduction=reduction)
    np.testing.assert_array_equal(loss, 0)
    np.testing.assert_array_equal(dz, 0)


def test_all_targets_ignored_mean_is_nan_gradient_zero(backend):
    # the unchanged case: no row contributes, loss 0/0 = NaN, every row ignored so dz = 0 (torch)
    loss, dz = _ce(backend, Z, np.full(4, -100), label_smoothing=0.1)
    assert np.isnan(loss)
    np.testing.assert_array_equal(dz, 0)


@pytest.mark.parametrize("case", range(3), ids=["all-zero", "zero-and-ignored", "targets-zero"])
def test_zero_target_weight_matches_torch(backend, case):
    target, weight, _ = _zero_weight_cases()[case]
    for ls in (0.0, 0.2):
        want_loss, want_dz = _torch_ce(Z, target, weight=weight, label_smoothing=ls)
        loss, dz = _ce(backend, Z, target, weight=weight, label_smoothing=ls)
        _same_nan_pattern(loss, want_loss)
        _same_nan_pattern(dz, want_dz)


# ---------------------------------------------------------------------------------------------
# label_smoothing < 0: torch checks only label_smoothing <= 1 and smooths only when it is > 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("ls", [-0.1, -1.0, -1e30])
def test_negative_label_smoothing_is_no_smoothing(backend, rng, ls, probs):
    z, _ = random(rng, (6, 7), np.float32, scale=3.0)
    target = (rng.dirichlet(np.ones(7), 6).astype(np.float32) if probs else rng.integers(0, 7, 6))
    loss, dz = _ce(backend, z, target, label_smoothing=ls)
    loss0, dz0 = _ce(backend, z, target, label_smoothing=0.0)
    np.testing.assert_array_equal(loss, loss0)
    np.testing.assert_array_equal(dz, dz0)


@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probabilities"])
def test_negative_label_smoothing_matches_torch(backend, rng, probs):
    z, z64 = random(rng, (6, 7), np.float32, scale=3.0)
    target = (rng.dirichlet(np.ones(7), 6).astype(np.float32) if probs else rng.integers(0, 7, 6))
    want_loss, want_dz = _torch_ce(z64, target, label_smoothing=-0.1)
    loss, dz = _ce(backend, z, target, label_smoothing=-0.1)
    assert_close(loss, want_loss, np.float32, "loss")
    assert_close(dz, want_dz, np.float32, "dz")


@pytest.mark.parametrize("ls", [1.0 + 1e-6, float("nan"), float("inf")])
def test_label_smoothing_above_one_or_not_finite_is_rejected(backend, ls):
    # torch raises for > 1 and for NaN (its check is label_smoothing <= 1). -inf is rejected here
    # too (deliberate: not a number a caller means; torch would treat it as 0).
    with pytest.raises(ValueError, match="label_smoothing"):
        backend.call(gpu.softmax_cross_entropy, Z, np.array([0, 1, 2, 3]), label_smoothing=ls)


# ---------------------------------------------------------------------------------------------
# An empty class axis
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((3, 0), -1),       # (batch, no classes)
                                        ((0, 0), -1),       # nothing at all
                                        ((2, 0, 3), 1),     # NCHW-style, no channels
                                        ((0, 4), 0)])       # the seed's (classes, m) layout, no classes
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_empty_class_axis_gives_empty_arrays(backend, shape, axis, dtype):
    # torch: softmax and log_softmax of an empty dimension are empty tensors of the input's shape.
    # hardmax (torch has none; argmax raises) follows: the one-hot over no classes is empty.
    z = np.zeros(shape, dtype)
    for fn in (gpu.softmax, gpu.log_softmax, gpu.hardmax):
        out = to_numpy(backend.call(fn, z, axis=axis))
        assert out.shape == shape and out.dtype == dtype, fn.__name__


def test_empty_class_axis_matches_torch():
    torch, _ = _torch()
    z = torch.zeros(2, 0, 3)
    assert tuple(torch.softmax(z, 1).shape) == (2, 0, 3) == tuple(torch.log_softmax(z, 1).shape)


# (reduction, label_smoothing, probabilities) -> torch's loss for 3 rows and no classes:
# integer targets must all be ignore_index (any other is out of range); the row losses are 0, or
# NaN with smoothing (ls / C = ls / 0); 'mean' is NaN (0 / 0: the summed target weight for
# indices, torch's rows = numel / C for probabilities).
NO_CLASS_CASES = [
    ("none", 0.0, False, [0.0, 0.0, 0.0]), ("sum", 0.0, False, 0.0), ("mean", 0.0, False, np.nan),
    ("none", 0.1, False, [np.nan] * 3), ("sum", 0.1, False, np.nan), ("mean", 0.1, False, np.nan),
    ("none", 0.1, True, [0.0, 0.0, 0.0]), ("sum", 0.1, True, 0.0), ("mean", 0.0, True, np.nan),
]


@pytest.mark.parametrize("reduction,ls,probs,want", NO_CLASS_CASES,
                         ids=[f"{r}-ls{ls}-{'probs' if p else 'indices'}" for r, ls, p, _ in NO_CLASS_CASES])
def test_cross_entropy_without_classes(backend, reduction, ls, probs, want):
    z = np.zeros((3, 0), np.float32)
    target = np.zeros((3, 0), np.float32) if probs else np.full(3, -100)
    loss, dz = _ce(backend, z, target, reduction=reduction, label_smoothing=ls)
    np.testing.assert_array_equal(loss, np.array(want))
    assert dz.shape == (3, 0)


def test_cross_entropy_without_classes_rejects_a_class_index(backend):
    # torch: IndexError "Target 0 is out of bounds"; here the usual ValueError naming the position
    with pytest.raises(ValueError, match=r"target: class index 0 at position \(1,\) is out of range \[0, 0\)"):
        backend.call(gpu.softmax_cross_entropy, np.zeros((3, 0), np.float32), np.array([-100, 0, -100]))


@pytest.mark.parametrize("case", range(len(NO_CLASS_CASES)))
def test_cross_entropy_without_classes_matches_torch(case):
    torch, F = _torch()
    reduction, ls, probs, want = NO_CLASS_CASES[case]
    target = torch.zeros(3, 0) if probs else torch.full((3,), -100)
    got = F.cross_entropy(torch.zeros(3, 0), target, reduction=reduction, label_smoothing=ls)
    np.testing.assert_array_equal(got.numpy(), np.array(want, np.float32))


# ---------------------------------------------------------------------------------------------
# The NumPy path's unshifted exp (gpu/ops/softmax/numpy_path.py UNSHIFTED_SUMS) and its fallback
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [-40.0, -12.0, 0.0, 30.0, 60.0, 85.0, 1e4])
def test_logit_offsets_keep_full_precision(backend, rng, offset):
    # rows far from 0 cross the unshifted range's edges (exp overflows past ~88, sums under 2^-20);
    # confident rows (small losses) check that log s - z_t keeps its digits per row
    z, z64 = random(rng, (64, 50), np.float32, scale=4.0, offset=offset)
    target = z.argmax(-1)
    z[np.arange(64), target] += 6        # peaked: losses around 1e-2 .. 1e-4
    z64 = z.astype(np.float64)
    loss, dz = backend.call(gpu.softmax_cross_entropy, z, target, return_grad=True, reduction="none")
    want, want_dz = ref.softmax_cross_entropy(z64, target, reduction="none")
    # each row's loss to float32 accuracy (not only the norm over rows): log s carries an error of a
    # few ulp of 1 (s's rounding), not of the offset (a float32 log s - z_t would: 60 * 2^-24)
    np.testing.assert_allclose(to_numpy(loss), want, rtol=3e-5, atol=4e-7)
    # dz_t = p_t - 1 cancels on peaked rows (an error of an ulp of 1 against a small norm), on every
    # path (the kernels' and torch's too): a looser bound than the table's
    assert_close(dz, want_dz, np.float32, "dz", factor=4)
    assert_close(backend.call(gpu.softmax, z), ref.softmax(z64, -1), np.float32, "softmax")
    assert_close(backend.call(gpu.log_softmax, z), ref.log_softmax(z64, -1), np.float32, "log_softmax")


def test_unshifted_and_shifted_blocks_mix(monkeypatch, rng):
    # NumPy path in blocks of 2 rows, where some blocks overflow the unshifted exp (+500 logits,
    # a -inf row, a NaN row) and are redone shifted: each block decides for itself
    sm = importlib.import_module("gpu.ops.softmax.numpy_path")
    monkeypatch.setattr(_cpu, "BLOCK_BYTES", 2 * 4 * 9)
    monkeypatch.setattr(sm, "DIRECT_BYTES", 0)
    z, _ = random(rng, (12, 9), np.float32, scale=3.0)
    z[2] += 500
    z[5] = -np.inf
    z[9, 3] = np.nan
    z64 = z.astype(np.float64)
    assert rel_err(gpu.softmax(z), ref.softmax(z64, -1)) <= 2e-5
    assert rel_err(gpu.log_softmax(z), ref.log_softmax(z64, -1)) <= 2e-5
    target = rng.integers(0, 9, 12)
    loss, dz = gpu.softmax_cross_entropy(z, target, return_grad=True, reduction="none")
    want, want_dz = ref.softmax_cross_entropy(z64, target, reduction="none")
    assert rel_err(loss, want) <= 2e-5 and rel_err(dz, want_dz) <= 2e-5
