"""Multi-process and multi-node pretraining from params: the stage relaunches itself through torchrun.

``python -m stages.pretrain --method M`` (what ``dvc repro``, ``dvc exp run``, ``sslcook run`` and the Prefect
deployments call) reads ``pretrain.processes`` (per node; ``auto`` = one per visible GPU, 1 on CPU) and
``pretrain.nodes``. When processes x nodes > 1 and this process is not already a torchrun worker, it hands the
same command to ``torch.distributed.run`` (the library behind ``torchrun``), which starts the workers, joins the
rendezvous and stops every worker when one fails. The workers run the stage's ordinary DDP path (rank 0 writes
the outputs and the resume checkpoints).

Rendezvous (several nodes): ``pretrain.rdzv_endpoint`` (host:port on node 0; else ``PET_RDZV_ENDPOINT`` or
``MASTER_ADDR``:``MASTER_PORT``), ``pretrain.rdzv_id`` (else ``PET_RDZV_ID`` / ``TORCHELASTIC_RUN_ID``, else
``sslcook-<method>``) and ``pretrain.node_rank`` (else ``NODE_RANK`` / ``PET_NODE_RANK``). With a node rank
torchrun's static rendezvous is used (node 0 hosts the store, its rank 0 process writes the outputs); without,
the c10d rendezvous assigns ranks in order of arrival (outputs then need storage every node sees). One node
uses torchrun's ``--standalone`` (a free port on 127.0.0.1).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .common import ConfigError, SslcookError
from .config.pretrain import PretrainConfig


def inside_worker() -> bool:
    """True in a process torchrun (or another launcher setting RANK/WORLD_SIZE) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@dataclass(frozen=True)
class Layout:
    processes: int  # per node
    nodes: int
    endpoint: str | None
    run_id: str
    node_rank: int | None

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def resolve_layout(cfg: PretrainConfig, method: str, key: str = "pretrain") -> Layout:
    """Processes, nodes and rendezvous from params (then torchrun's environment); ConfigError naming the key."""
    import torch

    gpus = torch.cuda.device_count() if cfg.device != "cpu" and torch.cuda.is_available() else 0
    if cfg.device == "cuda" and not gpus:
        raise ConfigError(f"params.yaml: {key}.device: cuda requested but no CUDA device is visible")
    processes = (gpus or 1) if cfg.processes == "auto" else int(cfg.processes)
    if gpus and processes > gpus:
        raise ConfigError(
            f"params.yaml: {key}.processes: {processes} processes per node need {processes} GPUs, {gpus} visible"
        )
    endpoint = cfg.rdzv_endpoint or _env("PET_RDZV_ENDPOINT")
    if not endpoint and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    node_rank: int | str | None = cfg.node_rank if cfg.node_rank is not None else _env("NODE_RANK", "PET_NODE_RANK")
    try:
        node_rank = None if node_rank is None else int(node_rank)
    except ValueError:
        raise ConfigError(f"NODE_RANK: expected an integer (got {node_rank!r})") from None
    if cfg.nodes > 1 and not endpoint:
        raise ConfigError(
            f"params.yaml: {key}.rdzv_endpoint: needed when {key}.nodes is {cfg.nodes} (host:port "
            f"of node 0, or MASTER_ADDR and MASTER_PORT in the environment)"
        )
    if node_rank is not None and not 0 <= node_rank < cfg.nodes:
        raise ConfigError(
            f"params.yaml: {key}.node_rank: {node_rank} is outside 0..{cfg.nodes - 1} ({key}.nodes is {cfg.nodes})"
        )
    run_id = cfg.rdzv_id or _env("PET_RDZV_ID", "TORCHELASTIC_RUN_ID") or f"sslcook-{method}"
    return Layout(processes=processes, nodes=cfg.nodes, endpoint=endpoint, run_id=run_id, node_rank=node_rank)


def torchrun_args(layout: Layout, command: list[str]) -> list[str]:
    """The torchrun command line for ``layout`` (``command``: ``-m module args...``)."""
    args = [f"--nnodes={layout.nodes}", f"--nproc_per_node={layout.processes}", "--max_restarts=0"]
    if layout.nodes == 1 and not layout.endpoint:
        args.append("--standalone")
    elif layout.node_rank is not None:
        args += [
            "--rdzv_backend=static",
            f"--rdzv_endpoint={layout.endpoint}",
            f"--node_rank={layout.node_rank}",
            f"--rdzv_id={layout.run_id}",
        ]
    else:
        args += ["--rdzv_backend=c10d", f"--rdzv_endpoint={layout.endpoint}", f"--rdzv_id={layout.run_id}"]
    return args + command


def launch_if_needed(cfg: PretrainConfig, method: str, command: list[str]) -> bool:
    """Run ``command`` under torch.distributed.run when the params ask for more than one process.

    Returns False when this process should train itself (one process, or already a torchrun worker); True once
    the workers have finished. A failed or killed worker stops them all (SslcookError with its exit code); the
    next run resumes from the last checkpoint rank 0 wrote.
    """
    if inside_worker():
        return False
    layout = resolve_layout(cfg, method)
    if layout.world_size == 1:
        return False
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = torchrun_args(layout, command)
    print(
        f"pretrain {method}: {layout.processes} process(es) x {layout.nodes} node(s) through torchrun {' '.join(argv)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        # the root cause first: a killed worker (its peers then fail in a collective), else the earliest failure
        order = sorted(exc.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp, item[0]))

        def how(code: int) -> str:
            return f"killed by signal {-code}" if code < 0 else f"exited with {code}"

        rank, failure = order[0]
        code = failure.exitcode
        others = "".join(f", rank {r} {how(f.exitcode)}" for r, f in order[1:])
        error = SslcookError(
            f"pretrain {method}: worker rank {rank} {how(code)}{others}; every worker stopped, "
            f"the next run resumes from the last checkpoint"
        )
        error.exit_code = code if code > 0 else 1
        raise error from None
    except SignalException as exc:
        raise KeyboardInterrupt from exc
    return True
