"""Gathered losses across 2 gloo processes equal one process on the concatenated batch (loss and gradients): SimCLR
and VICReg against a naive gather, MoCo v3, NNCLR, Barlow Twins, SwAV and DINO with the state they share across
ranks (support set, queue, centre); so does DirectPred's predictor, which is set from the global batch's
correlation; and the stateful methods train under DDP with their ranks in sync."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ssl_models import distributed
from ssl_models.methods.byol import DirectPredictor
from ssl_models.methods.dino import DINOLoss
from ssl_models.methods.moco import MoCoV3Loss
from ssl_models.methods.nnclr import NNCLRLoss, SupportSet
from ssl_models.methods.swav import SwAVLoss
from ssl_models.optim import build_optimizer
from support.dist_utils import (
    assert_matches_single,
    gathered_loss_case,
    gathered_loss_worker,
    run_distributed,
    single_process,
)
from support.method_checks import fake_views, make
from support.reference import randn

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
        predictor(z[rank * per_rank : (rank + 1) * per_rank])
    return predictor.weight.clone()


def correct_and_naive_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    correct = gathered_loss_worker(rank, world_size, cases)
    original = distributed.gather
    distributed.gather = _naive_gather
    try:
        naive = gathered_loss_worker(rank, world_size, cases)
    finally:
        distributed.gather = original
    helpers = {
        "rank": distributed.get_rank(),
        "world_size": distributed.get_world_size(),
        "offset": distributed.local_offset(4),
        "is_main": distributed.is_main_process(),
        "mean": distributed.all_reduce_mean(float(rank)),
        "gathered_no_grad": distributed.gather_no_grad(torch.full((2, 1), float(rank))),
        "syncbn_on_cpu_unchanged": isinstance(distributed.convert_sync_batchnorm(nn.BatchNorm1d(3)), nn.BatchNorm1d),
        "direct_pred_weight": _direct_pred_weight(_direct_pred_batches(), rank, world_size),
    }
    return {"correct": correct, "naive": naive, "helpers": helpers}


@pytest.mark.integration
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
        torch.testing.assert_close(
            h["direct_pred_weight"], _direct_pred_weight(_direct_pred_batches()), atol=1e-5, rtol=0
        )
    local_only = _direct_pred_weight([z[:4] for z in _direct_pred_batches()])
    assert (local_only - per_rank[0]["helpers"]["direct_pred_weight"]).abs().max() > 1e-3


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.gather(x) is x
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.local_offset(7)) == (0, 1, 0)
    assert float(distributed.all_reduce_mean(2.5)) == 2.5
    bn = nn.Sequential(nn.BatchNorm1d(4))
    assert distributed.convert_sync_batchnorm(bn) is bn


# ------------------------------------------------------------------------------------------------ more methods' losses
class MoCoCase(torch.nn.Module):
    """Symmetric MoCo v3 on (view 1, view 2): queries are the views, keys the same views detached."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = MoCoV3Loss(temperature=0.2)
        return loss(a, b) + loss(b, a)


class NNCLRCase(torch.nn.Module):
    """Symmetric NNCLR with a fixed support set (the same on every rank) and the views as predictions."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        support = SupportSet(size=10, dim=a.shape[1]).double()
        support.push(randn(10, a.shape[1], seed=123))
        loss = NNCLRLoss(temperature=0.1)
        return 0.5 * (loss(support.nearest(a), b) + loss(support.nearest(b), a))


class SwAVCase(torch.nn.Module):
    """SwAV on three crops against 5 fixed prototypes, optionally with a queue shared by every rank."""

    def __init__(self, queue: bool = False) -> None:
        super().__init__()
        self.queue = queue

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        prototypes = torch.nn.functional.normalize(randn(5, crops[0].shape[1], seed=321), dim=1)
        scores = [torch.nn.functional.normalize(c, dim=1) @ prototypes.T for c in crops]
        queued = None
        if self.queue:
            stored = torch.nn.functional.normalize(randn(2, 9, crops[0].shape[1], seed=322), dim=2)
            queued = [q @ prototypes.T for q in stored]
        return SwAVLoss(temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3)(scores, queued)


class DINOCase(torch.nn.Module):
    """DINO with 3 student crops and the first 2 inputs (detached) as teacher crops."""

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        criterion = DINOLoss(crops[0].shape[1], student_temperature=0.1).double()
        return criterion(list(crops), [c.detach() * 2 for c in crops[:2]], teacher_temperature=0.05)


GATHERED_CASES = [
    gathered_loss_case("test_distributed:MoCoCase", batch=5, dim=6, seed=3),
    gathered_loss_case("test_distributed:NNCLRCase", batch=5, dim=6, seed=4),
    gathered_loss_case(
        "ssl_models.methods.barlowtwins:BarlowTwinsLoss", {"lambda_offdiag": 0.1}, batch=5, dim=6, seed=5
    ),
    gathered_loss_case("test_distributed:SwAVCase", num_inputs=3, batch=6, dim=6, seed=6),
    gathered_loss_case("test_distributed:SwAVCase", {"queue": True}, num_inputs=3, batch=6, dim=6, seed=7),
    gathered_loss_case("test_distributed:DINOCase", num_inputs=3, batch=4, dim=6, seed=8),
]


def state_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    """The gathered-loss cases plus the states the methods share across ranks (support set, queue, centre)."""
    out = {"losses": gathered_loss_worker(rank, world_size, cases)}
    z = randn(world_size * 3, 4, seed=200)[rank * 3 : (rank + 1) * 3]
    support = SupportSet(size=5, dim=4).double()
    support.push(distributed.gather_no_grad(z))  # what NNCLR.after_step does
    out["support_queue"] = support.queue.clone()
    criterion = DINOLoss(4).double()
    teacher = randn(world_size * 3, 4, seed=201)[rank * 3 : (rank + 1) * 3]
    criterion.update_center(teacher)
    out["center"] = criterion.center.clone()
    return out


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_gathered_losses_and_shared_state_match_one_process():
    per_rank = run_distributed(state_worker, 2, (GATHERED_CASES,))
    # MoCo v3, NNCLR, Barlow Twins, SwAV (with and without a queue) and DINO over 2 gloo ranks equal one
    # process on the concatenated batch: rank-mean loss, DDP-averaged parameter gradients, input gradients
    assert_matches_single(GATHERED_CASES, [r["losses"] for r in per_rank], world_size=2, atol=1e-5)
    # every rank ends with the support set and the DINO centre one process computes from the global batch
    z_all = randn(6, 4, seed=200)
    single_support = SupportSet(size=5, dim=4).double()
    single_support.push(z_all)
    single_center = DINOLoss(4).double()
    single_center.update_center(randn(6, 4, seed=201))
    for r in per_rank:
        torch.testing.assert_close(r["support_queue"], single_support.queue)
        torch.testing.assert_close(r["center"], single_center.center)


# ------------------------------------------------------------------------------------------------ stateful methods, DDP
def ddp_worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    cases = {
        "dino": {"freeze_last_layer_frac": 0.5},
        "swav": {"freeze_prototypes_frac": 0.5, "queue_length": 16, "queue_start_frac": 0.0},
        "nnclr": {},
    }
    for name, kwargs in cases.items():
        torch.manual_seed(0)
        method = make(name, **kwargs)
        # buffers not broadcast: the support set, queue and centre must agree across ranks by construction
        model = torch.nn.parallel.DistributedDataParallel(method, find_unused_parameters=True, broadcast_buffers=False)
        optimizer = build_optimizer(method, {"name": "adamw", "base_lr": 1e-3, "lr_scaling": "none"}, 8)
        method.on_train_start(4)
        for step in range(4):
            method.before_step(step, 4)
            loss = model(fake_views(method, batch=4, seed=10 * rank + step))["loss"]  # each rank its own data
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_step(step, 4)
        out[name] = {
            "params": [p.detach().clone() for p in method.parameters()],
            "state": {
                k: b.clone()
                for k, b in method.named_buffers()
                if k.startswith(("support_set.", "queue.", "criterion.center"))
            },
        }
    return out


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_stateful_methods_train_under_ddp_with_ranks_in_sync():
    """DINO and SwAV through their frozen phases (parameters unused in a step) and NNCLR/SwAV/DINO's shared state
    (support set, queue, centre) on 2 gloo ranks with different data: everything stays identical across ranks."""
    per_rank = run_distributed(ddp_worker, 2)
    for name in per_rank[0]:
        a, b = per_rank[0][name], per_rank[1][name]
        assert a["state"], name
        for pa, pb in zip(a["params"], b["params"]):
            torch.testing.assert_close(pa, pb, msg=f"{name}: parameters differ across ranks")
        for key in a["state"]:
            torch.testing.assert_close(a["state"][key], b["state"][key], msg=f"{name}: {key} differs across ranks")
    assert int(per_rank[0]["nnclr"]["state"]["support_set.filled"]) == 4 * 2 * 4  # global batches pushed
    assert int(per_rank[0]["swav"]["state"]["queue.filled"]) == 16
