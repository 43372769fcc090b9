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
