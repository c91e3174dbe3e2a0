"""Gathered losses across 2 gloo processes equal one process on the concatenated batch (loss and gradients); so
does DirectPred's predictor, which is set from the global batch's correlation."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from support.dist_utils import (assert_matches_single, gathered_loss_case, gathered_loss_worker, run_distributed,
                        single_process)
from ssl_models import distributed
from ssl_models.methods.byol import DirectPredictor

CASES = [
    gathered_loss_case("ssl_models.methods.simclr:NTXentLoss", {"temperature": 0.2}),
    gathered_loss_case("ssl_models.methods.vicreg:VICRegLoss", {}, batch=5, dim=6, seed=1),
]


def _naive_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The classic bug: all_gather output has no autograd history; only the local slice keeps its gradient."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def _direct_pred_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 5, generator=g) @ torch.randn(5, 5, generator=g) for _ in range(2)]


def _direct_pred_weight(batches: list[torch.Tensor], rank: int = 0, world_size: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    predictor = DirectPredictor(5, eps=0.2, rho=0.3)
    for z in batches:
        per_rank = z.shape[0] // world_size
        predictor(z[rank * per_rank:(rank + 1) * per_rank])
    return predictor.weight.clone()


def correct_and_naive_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    correct = gathered_loss_worker(rank, world_size, cases)
    original = distributed.gather
    distributed.gather = _naive_gather
    try:
        naive = gathered_loss_worker(rank, world_size, cases)
    finally:
        distributed.gather = original
    helpers = {"rank": distributed.get_rank(), "world_size": distributed.get_world_size(),
               "offset": distributed.local_offset(4), "is_main": distributed.is_main_process(),
               "mean": distributed.all_reduce_mean(float(rank)),
               "gathered_no_grad": distributed.gather_no_grad(torch.full((2, 1), float(rank))),
               "syncbn_on_cpu_unchanged": isinstance(distributed.convert_sync_batchnorm(nn.BatchNorm1d(3)),
                                                    nn.BatchNorm1d),
               "direct_pred_weight": _direct_pred_weight(_direct_pred_batches(), rank, world_size)}
    return {"correct": correct, "naive": naive, "helpers": helpers}


@pytest.mark.timeout(240)
def test_gathered_losses_match_single_process_and_naive_gather_does_not():
    per_rank = run_distributed(correct_and_naive_worker, 2, (CASES,))
    # SimCLR's NT-Xent and VICReg over 2 ranks == 1 process on the concatenated batch, to 1e-5
    assert_matches_single(CASES, [r["correct"] for r in per_rank], world_size=2, atol=1e-5)

    # the check is sharp: a gather that drops the other ranks' gradients gives different parameter gradients
    for i, case in enumerate(CASES):
        ref = single_process(case, 2)
        naive_grad = per_rank[0]["naive"][i]["param_grads"][0]
        assert (naive_grad - ref["param_grads"][0]).abs().max() > 1e-3, case["loss"]
        # ... while the loss value alone cannot reveal the bug
        torch.testing.assert_close(per_rank[0]["naive"][i]["mean_loss"], ref["loss"], atol=1e-6, rtol=0)

    for rank, r in enumerate(per_rank):
        h = r["helpers"]
        assert (h["rank"], h["world_size"], h["offset"], h["is_main"]) == (rank, 2, 4 * rank, rank == 0)
        assert float(h["mean"]) == pytest.approx(0.5)
        assert h["gathered_no_grad"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
        assert h["syncbn_on_cpu_unchanged"]
        # DirectPred sets its predictor from the global batch: every rank's W_p equals one process on all rows
        torch.testing.assert_close(h["direct_pred_weight"], _direct_pred_weight(_direct_pred_batches()),
                                   atol=1e-5, rtol=0)
    local_only = _direct_pred_weight([z[:4] for z in _direct_pred_batches()])
    assert (local_only - per_rank[0]["helpers"]["direct_pred_weight"]).abs().max() > 1e-3


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather(x) is x
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.local_offset(7)) == (0, 1, 0)
    assert float(distributed.all_reduce_mean(2.5)) == 2.5
    bn = nn.Sequential(nn.BatchNorm1d(4))
    assert distributed.convert_sync_batchnorm(bn) is bn
