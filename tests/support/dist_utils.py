"""A reusable 2-process gloo harness for distributed tests (CPU only, no network beyond a file rendezvous).

``run_distributed(worker, world_size=2, args=())`` spawns ``world_size`` processes with torch.multiprocessing,
initialises a gloo process group (``file://`` rendezvous in a temp dir), calls ``worker(rank, world_size, *args)``
in each and returns the list of the workers' return values (dicts of tensors/numbers, passed back through
``torch.save`` / ``torch.load(weights_only=True)``). ``worker`` must be a module-level function (spawn pickles it
by name).

``gathered_loss_case(...)`` + ``check_gathered_losses(cases)``: the standard check for losses that gather the
global batch. For each case, a shared linear layer maps fixed inputs to embeddings; every rank computes the loss
on its slice, backpropagates, and averages parameter gradients as DDP does. The result must equal one process on
the concatenated batch: the rank-mean of the losses equals the single loss, the averaged parameter gradients equal
the single-process ones, and each rank's input gradient is ``world_size`` times the single-process gradient of its
slice (see ssl_models.distributed). Losses are addressed as "module:attribute" so the spawned processes can build
them; slice tests of other methods reuse this with their own loss classes.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, worker: Callable, world_size: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(worker: Callable, world_size: int = 2, args: tuple = ()) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="sslcook-dist-") as tmp:
        mp.spawn(_entry, args=(worker, world_size, tmp, tuple(args)), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def gathered_loss_case(
    loss: str, kwargs: dict | None = None, *, num_inputs: int = 2, batch: int = 6, dim: int = 8, seed: int = 0
) -> dict:
    """A check case: ``loss`` is "module:ClassName"; the loss is called as ``loss(*embeddings)`` -> scalar."""
    return {"loss": loss, "kwargs": kwargs or {}, "num_inputs": num_inputs, "batch": batch, "dim": dim, "seed": seed}


def _build_loss(case: dict) -> torch.nn.Module:
    module, attr = case["loss"].split(":")
    return getattr(importlib.import_module(module), attr)(**case["kwargs"])


def _inputs_and_layer(case: dict, world_size: int):
    g = torch.Generator().manual_seed(case["seed"])
    inputs = [
        torch.randn(world_size * case["batch"], case["dim"], generator=g, dtype=torch.float64)
        for _ in range(case["num_inputs"])
    ]
    layer = torch.nn.Linear(case["dim"], case["dim"]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(case["dim"], case["dim"], generator=g, dtype=torch.float64) / case["dim"] ** 0.5)
        layer.bias.copy_(torch.randn(case["dim"], generator=g, dtype=torch.float64) * 0.1)
    return inputs, layer


def _loss_and_grads(case: dict, inputs: list[torch.Tensor], layer: torch.nn.Module) -> dict:
    xs = [x.clone().requires_grad_(True) for x in inputs]
    loss = _build_loss(case)(*[layer(x) for x in xs])
    loss.backward()
    return {
        "loss": loss.detach(),
        "input_grads": [x.grad for x in xs],
        "param_grads": [p.grad.clone() for p in layer.parameters()],
    }


def gathered_loss_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    results = []
    for case in cases:
        inputs, layer = _inputs_and_layer(case, world_size)
        b = case["batch"]
        local = [x[rank * b : (rank + 1) * b] for x in inputs]
        out = _loss_and_grads(case, local, layer)
        for grad in out["param_grads"]:  # what DDP does to parameter gradients
            dist.all_reduce(grad)
            grad /= world_size
        mean_loss = out["loss"].clone()
        dist.all_reduce(mean_loss)
        out["mean_loss"] = mean_loss / world_size
        results.append(out)
    return results


def single_process(case: dict, world_size: int) -> dict:
    """The reference: one process, the concatenated global batch (no process group: gather is the identity)."""
    inputs, layer = _inputs_and_layer(case, world_size)
    return _loss_and_grads(case, inputs, layer)


def check_gathered_losses(cases: list[dict], world_size: int = 2, atol: float = 1e-5) -> list[dict]:
    """Run all cases in one 2-process spawn and assert they match one process; returns the per-rank results."""
    per_rank = run_distributed(gathered_loss_worker, world_size, (cases,))
    assert_matches_single(cases, per_rank, world_size, atol)
    return per_rank


def assert_matches_single(
    cases: list[dict], per_rank: list[list[dict]], world_size: int = 2, atol: float = 1e-5
) -> None:
    """Assert that gathered_loss_worker's per-rank results equal the single-process reference."""
    for i, case in enumerate(cases):
        ref = single_process(case, world_size)
        b = case["batch"]
        for rank in range(world_size):
            got = per_rank[rank][i]
            name = f"{case['loss']} rank {rank}"
            torch.testing.assert_close(got["mean_loss"], ref["loss"], atol=atol, rtol=0, msg=f"{name}: loss")
            for g, r in zip(got["param_grads"], ref["param_grads"]):
                torch.testing.assert_close(g, r, atol=atol, rtol=0, msg=f"{name}: parameter gradient")
            for g, r in zip(got["input_grads"], ref["input_grads"]):
                torch.testing.assert_close(
                    g / world_size, r[rank * b : (rank + 1) * b], atol=atol, rtol=0, msg=f"{name}: input gradient"
                )
