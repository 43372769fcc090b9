"""gpu.fused_linear_cross_entropy against a float64 reference that materializes the logits
(gpu.bench.reference.linear_cross_entropy): the loss, the z-loss term and dh, dW, dbias, on the
NumPy path and the emulated kernels (marker `kernel`), for the cross-entropy options, chunk
sizes around the row count and vocabularies 1, 7 and 50257; its determinism; and its memory on
the NumPy path (tracemalloc), against the materializing path.
"""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

import gpu
from gpu.bench import reference as ref
from gpu.ops import linear_cross_entropy as L
from conftest import DTYPES, assert_close, dtype_id

F32 = np.dtype(np.float32)


def _problem(rng, N, H, V, dtype=F32, bias=True, ignore=False):
    h = rng.standard_normal((N, H)).astype(dtype)
    W = (rng.standard_normal((V, H)) * (2 / np.sqrt(H))).astype(dtype)   # logits of a few units
    b = (rng.standard_normal(V) * 0.5).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    if ignore:
        t[::3] = -100
    return h, W, b, t


def _check(backend, h, W, b, t, dtype=F32, factor=4, **opts):
    out = backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, return_grad=True, return_z_loss=True, **opts)
    opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    w = opts.pop("weight", None)
    want = ref.linear_cross_entropy(h, W, t, b, weight=None if w is None else w.astype(np.float64), **opts)
    names = ("loss", "z-loss term", "dh", "dW", "dbias")
    for name, got, exp, like in zip(names, out, want, (None, None, h, W, b)):
        if exp is None:
            assert got is None, name
            continue
        assert got.shape == np.shape(exp), name
        assert got.dtype == dtype, name
        assert_close(got, exp, dtype, name, factor=factor)
    loss_only = backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, **opts,
                             **({"weight": w} if w is not None else {}))
    assert_close(loss_only, want[0], dtype, "loss only", factor=factor)


OPTIONS = [
    ("plain", {}),
    ("ignore-smooth", {"label_smoothing": 0.1}),                       # ignored rows: no loss, no gradient
    ("weight", {"weight": True}),
    ("all", {"weight": True, "label_smoothing": 0.2, "z_loss": 0.05, "softcap": 3.0}),   # both 'mean' denominators
    ("zloss-softcap", {"z_loss": 1e-2, "softcap": 2.0}),
    ("ignore-class", {"ignore_index": 3}),                            # a valid class as ignore_index
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,opts", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_options(backend, rng, name, opts, reduction):
    V = 13
    h, W, b, t = _problem(rng, 10, 6, V, ignore=name in ("ignore-smooth", "all"))
    opts = dict(opts)
    if opts.get("weight"):
        opts["weight"] = (rng.random(V) + 0.5).astype(F32)
    _check(backend, h, W, b, t, reduction=reduction, chunk_size=4, **opts)


@pytest.mark.parametrize("chunk", [1, 7, 11, 100], ids=["1-row", "prime", "all-rows-exactly", "more-than-rows"])
def test_chunk_sizes(backend, rng, chunk):
    # 1 row a chunk; 7 (prime: a short last chunk of 4 of the 11 rows); 11; more than all rows
    h, W, b, t = _problem(rng, 11, 5, 9, ignore=True)
    _check(backend, h, W, b, t, chunk_size=chunk, z_loss=0.1, softcap=4.0, label_smoothing=0.1)


@pytest.mark.parametrize("V", [1, 7])
def test_small_vocab(backend, rng, V):
    # vocab 1: the cross-entropy is 0 (p = 1), only the z-loss has a gradient; vocab 7: prime
    h, W, b, t = _problem(rng, 6, 4, V)
    _check(backend, h, W, b, t, chunk_size=4, z_loss=0.1)
    _check(backend, h, W, b, t, chunk_size=4, reduction="sum")


def test_gpt2_vocab(backend, rng):
    # vocab 50257 (GPT-2's: not a multiple of any vector width; the block paths on the kernels),
    # few rows to stay fast; two chunks
    h, W, b, t = _problem(rng, 3, 8, 50257)
    _check(backend, h, W, b, t, chunk_size=2, z_loss=1e-4, softcap=30.0, factor=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes(backend, rng, dtype):
    # float16 / bfloat16 in, float32 matmuls and accumulation, the inputs' dtype out
    h, W, b, t = _problem(rng, 9, 8, 20, dtype=dtype, ignore=True)
    _check(backend, h, W, b, t, dtype=dtype, chunk_size=4, z_loss=0.01, factor=4)


def test_leading_axes_and_dloss(backend, rng):
    # h (batch, time, H) with target (batch, time); dloss scales every gradient, per row for 'none'
    h, W, _, t = _problem(rng, 12, 6, 11, bias=False)
    h3, t2 = h.reshape(3, 4, 6), t.reshape(3, 4)
    dl = rng.standard_normal((3, 4)).astype(F32)
    for red, d in (("none", dl), ("mean", 2.5), ("sum", -0.5)):
        out = backend.call(gpu.fused_linear_cross_entropy, h3, W, t2, reduction=red, chunk_size=5,
                           return_grad=True, dloss=d, z_loss=0.1)
        want = ref.linear_cross_entropy(h3, W, t2, reduction=red, dloss=np.asarray(d, np.float64), z_loss=0.1)
        assert out[1].shape == h3.shape and out[3] is None
        for got, exp, what in zip(out, (want[0], want[2], want[3]), ("loss", "dh", "dW")):
            assert_close(got, exp, F32, f"{what} {red}", factor=4)


def test_same_chunking_same_bits(backend, rng):
    h, W, b, t = _problem(rng, 23, 8, 37, ignore=True)
    opts = dict(chunk_size=5, return_grad=True, z_loss=0.1, softcap=3.0, weight=np.linspace(0.5, 2, 37))
    a = backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, **opts)
    c = backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, **opts)
    for x, y in zip(a, c):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_all_ignored_and_empty(backend, rng):
    h, W, b, t = _problem(rng, 4, 3, 5)
    t[:] = -100
    loss, zt, dh, dW, db = backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, z_loss=0.1, return_grad=True,
                                        return_z_loss=True, chunk_size=3)
    assert np.isnan(loss) and np.isnan(zt)                         # a mean over nothing: NaN
    assert not dh.any() and not dW.any() and not db.any()         # ... and no gradient
    loss, dh, dW, db = backend.call(gpu.fused_linear_cross_entropy, h[:0], W, t[:0], b, reduction="sum",
                                    return_grad=True)
    assert loss == 0 and dh.shape == (0, 3) and not dW.any()


def test_bad_target_position(backend, rng):
    """The NumPy path raises in the call; the kernel path records the target's row in the whole
    call (not in its chunk: 6 is row 2 of the second chunk of 4) for gpu.check_errors(), or
    raises in the call with eager checks."""
    h, W, b, t = _problem(rng, 9, 3, 5)
    t[6] = 5
    gpu.check_errors()
    if backend.name == "numpy":
        with pytest.raises(ValueError, match=r"class index 5 at position \(6,\)"):
            backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, chunk_size=4)
        return
    backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, chunk_size=4)
    with pytest.raises(ValueError, match=r"class index 5 at row 6 "):
        gpu.check_errors()
    previous = gpu.set_eager_checks(True)
    try:
        with pytest.raises(ValueError, match=r"class index 5 at position \(6,\)"):
            backend.call(gpu.fused_linear_cross_entropy, h, W, t, b, chunk_size=4)
    finally:
        gpu.set_eager_checks(previous)
    gpu.check_errors()   # nothing left behind


BAD = [
    (dict(W=np.ones((5, 4), np.float32)), ValueError, "W.shape"),                 # hidden sizes differ
    (dict(W=np.ones(5, np.float32)), ValueError, "W: expected a 2-D"),
    (dict(W=np.ones((5, 3), np.float64)), TypeError, "W: dtype"),
    (dict(h=np.ones((4, 3), np.int32)), TypeError, "h: dtype"),
    (dict(bias=np.ones(4, np.float32)), ValueError, "bias: expected shape"),
    (dict(bias=np.ones(5, np.float64)), TypeError, "bias: dtype"),
    (dict(target=np.ones((4, 1), np.int64)), ValueError, "target: expected h's shape"),
    (dict(target=np.ones(4, np.float32)), TypeError, "target: expected integer"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
    (dict(weight=np.ones(4)), ValueError, "weight"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(dloss=np.ones(4)), ValueError, "dloss"),                                # 'mean' wants a scalar
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments(backend, change, exc, match):
    args = dict(h=np.ones((4, 3), np.float32), W=np.ones((5, 3), np.float32), target=np.zeros(4, np.int64),
                bias=None) | change
    with pytest.raises(exc, match=match):
        backend.call(gpu.fused_linear_cross_entropy, args.pop("h"), args.pop("W"), args.pop("target"),
                     args.pop("bias"), return_grad=True, **args)


def test_auto_chunk_is_bounded():
    # the NumPy path's chunk: the 64 MiB bound over a row's bytes (logits, their gradient, h, dh)
    rows = L.chunk_rows(np, 4096, 50257, 1024, F32, True)
    assert rows * (2 * 50257 + 2 * 1024) * 4 <= L.NUMPY_CHUNK_BYTES < (rows + 1) * (2 * 50257 + 2 * 1024) * 4


def _peak(fn):
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_chunk(rng):
    # (4096 tokens, 1024 hidden, 50257 vocab), float32: ~1.3 TFLOP of matmuls and ~1.6 GB in the
    # materializing path, about 20 s on 2 cores; the fused peak must stay within the 32 MiB chunk
    # budget plus the gradients, and 5x below the materializing one (measured: 259 against 1572 MiB)
    N, H, V = 4096, 1024, 50257
    h = (rng.standard_normal((N, H)) * 0.1).astype(F32)
    W = (rng.standard_normal((V, H)) * 0.1).astype(F32)
    t = rng.integers(0, V, N)
    ours, out = _peak(lambda: gpu.fused_linear_cross_entropy(h, W, t, return_grad=True))
    grads = (h.nbytes + W.nbytes)                  # dh and dW
    # the chunk, the dW slab's temporary (at most the chunk's logits, half the chunk), the
    # gradients, and the NumPy cross-entropy's per-thread row-block scratch
    bound = 1.5 * L.NUMPY_CHUNK_BYTES + grads + (4 << 20)
    assert ours <= bound, f"peak {ours / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    del out

    def materialized():   # the path without fusion: float32 logits, their gradient, the matmuls
        z = h @ W.T
        loss, dz = gpu.softmax_cross_entropy(z, t, return_grad=True)
        del z
        return loss, dz @ W, dz.T @ h

    theirs, want = _peak(materialized)
    assert theirs >= 5 * ours, f"materializing {theirs / 2**20:.0f} MiB, fused {ours / 2**20:.0f} MiB: not 5x"


def test_bench_flce_runs(tmp_path):
    # gpu-bench --op flce on a tiny CPU shape: every peer checked against the materializing path
    import json
    from gpu.bench import cli
    out = tmp_path / "flce.json"
    assert cli.main(["--op", "flce", "--device", "cpu", "--shape", "64x8x100", "--repeat", "1", "--warmup", "0",
                     "--json", str(out)]) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"ours", "numpy"} <= set(rows)
    assert all(r["max_rel_err"] < 1e-5 and r["ms"] > 0 for r in rows.values())
    assert cli.main(["--op", "flce,softmax"]) == 2
