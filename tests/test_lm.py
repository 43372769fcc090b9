"""gpu-train --task lm: the character-level language model with the fused head (gpu/lm.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpu import lm, train


def test_corpus_is_seeded_and_structured():
    a, b = lm.make_corpus(2000, seed=1), lm.make_corpus(2000, seed=1)
    assert a == b and len(a) == 2000 and a != lm.make_corpus(2000, seed=2)
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyzTACMO .!")


def test_fused_and_materialized_heads_agree():
    text = lm.make_corpus(3000)
    chars = sorted(set(text))
    X, y = lm.windows(np.array([chars.index(c) for c in text]), 4)
    for bn in (False, True):
        model = lm.CharLM(np, len(chars), 4, 8, 32, bn, seed=0)
        la, ga = model.loss_and_grads(X[:300], y[:300], fused=True, chunk_size=7)
        lb, gb = model.loss_and_grads(X[:300], y[:300], fused=False)
        np.testing.assert_allclose(la, lb, rtol=1e-5)
        for k in ga:
            np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_train_lm_writes_curve_and_memory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lm"
    assert train.main(["--task", "lm", "--max-steps", "40", "--lm-chars", "3000", "--lm-hidden", "32",
                       "--lm-memory-batch", "256", "--out", str(out)]) == 0
    summary = json.loads((out / "lm.json").read_text())
    assert (out / "lm_loss.png").stat().st_size > 0
    assert summary["val_loss_final"] < summary["uniform_loss"]          # it learned something
    assert set(summary["peak_step_bytes"]) == {"fused", "materialized"}
    assert "peak memory" in capsys.readouterr().out


def test_lm_bad_arguments(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "lm", "--lm-context", "0", "--out", str(tmp_path)])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# --tensor-parallel: the head split by vocabulary over 2 local ranks
# ---------------------------------------------------------------------------------------------

#: a small float64 run: 12 steps, validation every 4; the vocabulary (30 characters) splits 15/15
LM_TP = ["--task", "lm", "--lm-dtype", "float64", "--max-steps", "12", "--eval-every", "4", "--lm-chars", "2000",
         "--lm-hidden", "32", "--batch-size", "64", "--lm-memory-batch", "64"]
_SINGLE: dict = {}


def _tp_engines():
    from test_distributed import ENGINES
    return ENGINES


@pytest.mark.parametrize("engine", _tp_engines())
def test_tensor_parallel_loss_curve_equals_single_process(engine, tmp_path):
    pytest.importorskip("matplotlib")
    from test_distributed import run_ranks
    if "summary" not in _SINGLE:
        assert train.main([*LM_TP, "--out", str(tmp_path / "one")]) == 0
        _SINGLE["summary"] = json.loads((tmp_path / "one" / "lm.json").read_text())
    one = _SINGLE["summary"]
    flags = ["--distributed", "mpi" if engine == "mpi" else "torch", "--tensor-parallel", "2"]
    outs = run_ranks(engine, 2, ["-m", "gpu.train", *LM_TP, *flags, "--out", str(tmp_path / "two")], timeout=120)
    two = json.loads((tmp_path / "two" / "lm.json").read_text())
    assert two["tensor_parallel"] == 2 and one["tensor_parallel"] == 1
    # the same steps up to rounding: dh is summed over ranks in another order than one matmul's
    for key in ("step_loss", "val_loss"):
        np.testing.assert_allclose(two["curves"][key], one["curves"][key], rtol=1e-10, err_msg=key)
    assert two["curves"]["eval_step"] == one["curves"]["eval_step"]
    assert two["sample"] == one["sample"]                   # the gathered head samples the same text
    assert sum(o.count("validation loss") for o in outs) == 1       # rank 0 logs, rank 1 does not


def test_tensor_parallel_arguments(tmp_path):
    for argv in (["--task", "lm", "--tensor-parallel", "2"],                  # no --distributed
                 ["--task", "lm", "--distributed", "mpi"],                    # no --tensor-parallel
                 ["--tensor-parallel", "2"]):                                 # not --task lm
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2


def test_vocab_slice_covers_the_vocabulary_in_rank_order():
    for V, k in ((30, 2), (11, 3), (2, 4), (1, 1)):     # equal, unequal, empty shares
        shares = [lm.vocab_slice(V, r, k) for r in range(k)]
        assert [i for s in shares for i in range(V)[s]] == list(range(V))
        assert shares[0].stop - shares[0].start == max(s.stop - s.start for s in shares)
