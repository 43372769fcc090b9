"""DistributedDataParallel with gpu.torch.SyncBatchNorm on CPU tensors over gloo: 2 ranks on
127.0.0.1 (tests/_ddp_worker.py, bounded in time, process groups killed on failure) train a few
SGD steps on unequal shares of each batch; one process trains the unconverted model on the whole
batch. torch's own SyncBatchNorm is refused by DDP in a CPU module; ours is not.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as W  # noqa: E402
from test_distributed import HAVE_TORCH, run_ranks  # noqa: E402

WORKER = Path(__file__).parent / "_ddp_worker.py"

pytestmark = pytest.mark.skipif(not HAVE_TORCH, reason="torch missing")


def test_ddp_with_sync_batchnorm_equals_one_process_on_the_whole_batch(tmp_path):
    import torch
    run_ranks("gloo", 2, [str(WORKER), str(tmp_path)], timeout=120)
    ranks = [(dict(np.load(tmp_path / f"rank{r}.npz")), json.loads((tmp_path / f"rank{r}.json").read_text()))
             for r in range(2)]
    for _, info in ranks:
        assert info["types"] == ["gpu.torch.sync_batchnorm.SyncBatchNorm"] * 2
        assert info["isinstance_ours"] == [True, True]
        assert info["isinstance_torch_sync"] == [False, False]     # what lets DDP take a CPU module

    net = W.model()
    opt = W.optimizer(net.parameters())
    for step in range(W.STEPS):
        x, t = W.batch(step)
        y = net(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(y, torch.from_numpy(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        whole = np.concatenate([a[f"out/{step}"] for a, _ in ranks])
        np.testing.assert_allclose(whole, y.detach().numpy(), rtol=1e-9, atol=1e-11, err_msg=f"step {step}")
        got = sum(float(a[f"loss/{step}"]) for a, _ in ranks)
        assert got == pytest.approx(loss.item(), rel=1e-10), step
    for k, v in net.state_dict().items():                 # parameters after the steps, running statistics
        for r, (a, _) in enumerate(ranks):
            np.testing.assert_allclose(a[f"state/{k}"], v.numpy(), rtol=1e-9, atol=1e-11, err_msg=f"rank {r}: {k}")
    assert int(ranks[0][0]["state/5.num_batches_tracked"]) == W.STEPS


def test_torch_sync_batchnorm_is_what_ddp_refuses_on_the_cpu():
    # the reason ours is not a torch.nn.SyncBatchNorm subclass; a group of one rank in this process
    import datetime
    import socket
    import torch
    import torch.distributed as dist
    import gpu.torch as gt
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
            torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(gt.SyncBatchNorm(3)))
        x = torch.randn(4, 3, dtype=torch.float32)
        torch.testing.assert_close(ddp(x), torch.nn.functional.batch_norm(x, None, None, training=True))
    finally:
        dist.destroy_process_group()
