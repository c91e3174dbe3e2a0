"""One training loop for every SSL method: device, precision, distributed, monitoring, checkpoints, resume.

    runtime = setup_runtime("auto")                    # CUDA if present, else CPU; DDP from torchrun's env
    trainer = Trainer(method, optimizer, scheduler=sched, make_loader=lambda epoch: loader_for(epoch),
                      config=TrainConfig(epochs=10, steps_per_epoch=15, seed=0), runtime=runtime,
                      checkpoint_path="resume/state.pt")
    result = trainer.fit()                             # resumes from checkpoint_path when it exists

The engine knows nothing about params files or pipelines; it relies only on the :class:`SSLMethod` interface
(``forward(views) -> {"loss", "embedding", diagnostics...}`` and the step hooks).

Views. With ``views=`` (a ViewMaker of :mod:`ssl_models.augment`), the loader yields uint8 image batches: each
goes to the device first (non-blocking; pinned by the loader on CUDA), then ``views(images, generator)`` makes the
float view batches there, every random parameter drawn from ``view_generator(seed, epoch, step, rank)``: a
function of the step alone, so a resumed run redraws the same views and every DDP rank draws its own. Without
``views`` the loader yields the views itself.

Reproducibility. Model randomness (MAE masks, dropout) and data randomness (shuffling, augmentations) use
separate random streams: every ``next()`` on the loader runs under a data stream seeded from
(seed, epoch, rank), the views under their per-step generator, the model under the global generators. So the
batches of an epoch depend only on (seed, epoch, rank), and resuming in the middle of an epoch replays the same
batches: the loader of that epoch is rebuilt and the batches already consumed are drawn and dropped. With the
model's own RNG state restored from the checkpoint, a resumed run ends with weights equal to an uninterrupted one
(CPU).

Checkpoints are written atomically (temporary file + ``os.replace``) by rank 0 only, and loaded with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, nothing pickled.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .device import DeviceError, select_device
from .distributed import convert_sync_batchnorm
from .monitors import MonitorConfig, detect_collapse, embedding_std, rankme

STATE_FORMAT = "sslcook-train-state/1"


class TrainingError(RuntimeError):
    """Training cannot go on (the caller turns it into a one-line user error)."""


class NonFiniteLossError(TrainingError):
    def __init__(self, step: int, epoch: int, value: float, checkpoint: str | None):
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint
        kept = f"; last good checkpoint kept: {checkpoint}" if checkpoint else "; no checkpoint written yet"
        super().__init__(
            f"non-finite loss ({value}) at step {step} (epoch {epoch + 1}){kept}; "
            "lower the learning rate, enable grad_clip or check the inputs"
        )


class CollapseError(TrainingError):
    def __init__(self, epoch: int, reasons: list[str]):
        self.epoch, self.reasons = epoch, reasons
        super().__init__(f"representation collapse after epoch {epoch + 1}: {'; '.join(reasons)} (monitor.fatal is on)")


# --------------------------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its device and its place in the (possibly 1-process) job."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group when > 1 process.

    gloo on CPU, NCCL on GPU (each rank on cuda:LOCAL_RANK).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    try:
        dev = select_device(device)
    except DeviceError as exc:
        raise TrainingError(str(exc)) from None
    if dev.type == "cuda" and world_size > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank)


def teardown_runtime(runtime: Runtime, barrier: bool = True) -> None:
    """Leave the process group (after waiting for every rank, unless this rank is failing)."""
    if runtime.distributed and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- random state
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def capture_rng_state() -> dict[str, Any]:
    """The global generators' states as tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "internal": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DataStream:
    """Iterate a loader under its own random stream, leaving the model's generators untouched.

    Every call into the loader (building its iterator, each ``next``) swaps in the stream's Python, NumPy and
    torch states and swaps them back after, so augmentations drawn in the main process (num_workers=0) or
    the worker seeds drawn when the iterator starts (num_workers>0) depend only on ``seed``.
    """

    def __init__(self, loader: Iterable, seed: int):
        torch_gen = torch.Generator().manual_seed(seed)
        self._torch = torch_gen.get_state()
        self._numpy = np.random.RandomState(seed % 2**32).get_state()
        self._python = random.Random(seed).getstate()
        with self._swapped():
            self._it = iter(loader)

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.set_rng_state(self._torch)
        np.random.set_state(self._numpy)
        random.setstate(self._python)
        try:
            yield
        finally:
            self._torch, self._numpy, self._python = torch.get_rng_state(), np.random.get_state(), random.getstate()
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    def __iter__(self) -> DataStream:
        return self

    def close(self) -> None:
        """Finish the loader's iterator now (its worker processes exit) rather than when it is collected."""
        close = getattr(self._it, "close", None)
        if close is not None:
            with self._swapped():
                close()

    def __next__(self) -> Any:
        with self._swapped():
            return next(self._it)


# --------------------------------------------------------------------------------------------- monitors
@dataclass
class KnnMonitor:
    """An online kNN top-1 on a labelled split every ``every_epochs`` epochs (and after the last one).

    Images are uint8 (N x C x H x W); ``transform`` maps a uint8 batch to the backbone's input (the eval
    transform). The protocol is :mod:`ssl_models.evaluation`'s (cosine, weighted vote exp(sim / T)).
    """

    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    every_epochs: int = 1
    k: int = 20
    temperature: float = 0.1
    batch_size: int = 512

    def __call__(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        from .evaluation import extract_features, knn_evaluate

        def features(images: torch.Tensor) -> torch.Tensor:
            return extract_features(
                backbone, images, transform=self.transform, batch_size=self.batch_size, device=device, progress=False
            )

        result = knn_evaluate(
            features(self.bank_images),
            self.bank_labels,
            features(self.query_images),
            self.query_labels,
            ks=(self.k,),
            temperature=self.temperature,
        )
        return {"knn_top1": result[f"knn_top1_k{self.k}"]}


# --------------------------------------------------------------------------------------------- checkpoints
def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a kill never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainConfig:
    epochs: int
    steps_per_epoch: int
    seed: int = 0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    checkpoint_every_steps: int = 0  # 0: at epoch ends only
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU
    channels_last: bool = True  # on CUDA
    sync_batchnorm: bool | None = None  # None: the method's own wish (attribute sync_batchnorm, default True)
    log_every_steps: int = 10  # progress-bar refresh, and the loss check on CUDA
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    progress: bool = True
    desc: str = "train"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    summary: dict[str, Any]
    resumed_from_step: int | None


def _scalar(v: Any) -> torch.Tensor | float | None:
    if isinstance(v, torch.Tensor):
        return v.detach().float() if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class Trainer:
    """Trains one :class:`SSLMethod` (see the module docstring).

    ``make_loader(epoch)`` returns that epoch's iterable of ``(views, labels)`` for this rank (``(images,
    labels)`` uint8 batches when ``views`` makes the views, see the module docstring); it is called once per
    epoch and must give the same batches for the same epoch. ``scheduler`` steps once per
    optimisation step. ``on_epoch_end(record)`` and ``on_log(step, values)`` run on rank 0 only (logging);
    ``extra_state`` (plain data) is stored in every checkpoint and returned by :meth:`resume_info`.
    ``dataset_pass()`` (for methods with ``uses_dataset``): this rank's share of the training set, once, in a
    fixed order, as ``(views, labels, keys)`` batches; handed to ``method.on_epoch_start``. Such methods also get
    each training batch's keys (``make_loader`` must then yield ``(views, labels, keys)``).
    """

    def __init__(
        self,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        config: TrainConfig,
        make_loader: Callable[[int], Iterable],
        runtime: Runtime | None = None,
        scheduler: Any = None,
        checkpoint_path: str | os.PathLike | None = None,
        knn: KnnMonitor | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        dataset_pass: Callable[[], Iterable] | None = None,
        views: Callable[[torch.Tensor, torch.Generator], list[torch.Tensor]] | None = None,
    ):
        self.method = method
        self.views = views
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.make_loader = make_loader
        self.runtime = runtime or Runtime(device=select_device("auto"))
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.knn = knn
        self.on_epoch_end = on_epoch_end
        self.on_log = on_log
        self.extra_state = dict(extra_state or {})
        self.dataset_pass = dataset_pass
        self.history: list[dict[str, Any]] = []
        self._saved_state: dict[str, Any] | None = None
        self._last_checkpoint_step: int | None = None
        self.device = self.runtime.device
        self.amp_dtype = self._amp_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.model = self._prepare(method)

    # -- setup
    @staticmethod
    def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
        if precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        if precision == "fp16":
            if device.type != "cuda":
                raise TrainingError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
            return torch.float16
        raise TrainingError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, method: nn.Module) -> nn.Module:
        cuda = self.device.type == "cuda"
        method.to(self.device)
        if cuda and self.config.channels_last:
            method.to(memory_format=torch.channels_last)
        if self.runtime.distributed:
            want_sync = self.config.sync_batchnorm
            if want_sync is None:
                want_sync = getattr(method, "sync_batchnorm", True)
            if want_sync and cuda:  # torch's SyncBatchNorm runs on GPUs only
                self.method = method = convert_sync_batchnorm(method)
            # find_unused_parameters: some methods leave parameters out of a step's graph (frozen
            # prototypes, a decoder token); DDP would otherwise wait for their gradients forever.
            return nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if cuda else None, find_unused_parameters=True
            )
        return method

    # -- state
    def _teacher_outside(self) -> dict[str, nn.Module]:
        """Teacher modules that method.state_dict() does not already hold."""
        registered = {id(m) for m in self.method.modules()}
        return {k: m for k, m in self.method.teacher_modules().items() if id(m) not in registered}

    def state_dict(self, epoch: int, step_in_epoch: int, acc: dict[str, Any]) -> dict[str, Any]:
        rng = capture_rng_state()
        if self.runtime.distributed:
            gathered: list[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
        else:
            rng_per_rank = [rng]
        return {
            "format": STATE_FORMAT,
            "method_state": self.method.state_dict(),
            "teacher_state": {k: m.state_dict() for k, m in self._teacher_outside().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "rng_per_rank": rng_per_rank,
            "position": {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": epoch * self.config.steps_per_epoch + step_in_epoch,
                "steps_per_epoch": self.config.steps_per_epoch,
                "world_size": self.runtime.world_size,
            },
            "epoch_accumulators": acc,
            "history": self.history,
            "extra": self.extra_state,
        }

    def _save(self, epoch: int, step_in_epoch: int, acc: dict[str, Any]) -> None:
        if self.checkpoint_path is None:
            return
        state = self.state_dict(epoch, step_in_epoch, acc)  # collective in DDP: every rank calls it
        if self.runtime.is_main:
            save_state(self.checkpoint_path, state)
            self._last_checkpoint_step = state["position"]["global_step"]
        if self.runtime.distributed:
            dist.barrier()

    def _load(self, state: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{self.checkpoint_path}: not a training state ({state.get('format')!r})")
        pos = state["position"]
        if pos["steps_per_epoch"] != self.config.steps_per_epoch or pos["world_size"] != self.runtime.world_size:
            raise TrainingError(
                f"{self.checkpoint_path}: saved with {pos['steps_per_epoch']} steps/epoch on "
                f"{pos['world_size']} process(es), now {self.config.steps_per_epoch} on "
                f"{self.runtime.world_size}: cannot resume"
            )
        self.method.load_state_dict(state["method_state"])
        for k, m in self._teacher_outside().items():
            m.load_state_dict(state["teacher_state"][k])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None and state["scheduler_state"] is not None:
            self.scheduler.load_state_dict(state["scheduler_state"])
        if self.scaler is not None and state["scaler_state"] is not None:
            self.scaler.load_state_dict(state["scaler_state"])
        restore_rng_state(state["rng_per_rank"][self.runtime.rank])
        self.history = list(state["history"])
        self.extra_state = dict(state.get("extra") or {}) | self.extra_state
        self._last_checkpoint_step = pos["global_step"]
        return pos["epoch"], pos["step_in_epoch"], dict(state["epoch_accumulators"])

    def resume_info(self) -> dict[str, Any] | None:
        """The ``extra`` dict and position of the checkpoint that fit() will resume from, if any."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return None
        state = load_state(self.checkpoint_path)
        return {"extra": state.get("extra") or {}, "position": state["position"]}

    # -- loop
    def _new_accumulators(self) -> dict[str, Any]:
        return {
            "loss_sum": 0.0,
            "steps": 0,
            "images": 0,
            "seconds": 0.0,
            "data_wait": 0.0,
            "diag_sums": {},
            "embeddings": [],
        }

    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if (self.device.type == "cuda" and self.config.channels_last) else None
        out = []
        for v in views:
            v = v.to(self.device, non_blocking=True)
            if fmt is not None and v.dim() == 4:
                v = v.contiguous(memory_format=fmt)
            out.append(v)
        return out

    def _make_views(self, images: torch.Tensor, epoch: int, step: int) -> list[torch.Tensor]:
        """A uint8 batch -> its float views, made on the training device from the step's own generator."""
        from .augment import view_generator

        images = images.to(self.device, non_blocking=True)
        return list(self.views(images, view_generator(self.config.seed, epoch, step, self.runtime.rank)))

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _check_finite(self, pending: list[tuple[int, int, torch.Tensor]]) -> None:
        """Raise on the first non-finite loss among ``pending`` (step, epoch, loss) and clear it."""
        if not pending:
            return
        losses = torch.stack([p[2] for p in pending]).float()
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            step, epoch, _ = pending[i]
            raise NonFiniteLossError(
                step,
                epoch,
                float(losses[i]),
                str(self.checkpoint_path) if self._last_checkpoint_step is not None else None,
            )
        pending.clear()

    def _epoch_metrics(self, epoch: int, acc: dict[str, Any]) -> dict[str, Any]:
        steps = max(acc["steps"], 1)
        loss = acc["loss_sum"] / steps
        images = acc["images"]
        seconds = acc["seconds"]
        if self.runtime.distributed:
            t = torch.tensor([loss, float(images)], dtype=torch.float64)
            dist.all_reduce(t)
            loss, images = float(t[0]) / self.runtime.world_size, int(t[1])
            seconds_t = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(seconds_t, op=dist.ReduceOp.MAX)
            seconds = float(seconds_t[0])
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * self.config.steps_per_epoch,
            "loss": loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": images / seconds if seconds > 0 else float("nan"),
            "epoch_seconds": seconds,
            # time the loop waited on the loader (this rank): a measurement of the run, not of the weights
            "data_wait_seconds": float(acc.get("data_wait", 0.0)),
        }
        emb = acc["embeddings"]
        if emb:
            z = torch.cat([e.cpu() for e in emb])[-self.config.monitor.samples :]
            record["emb_std"] = float(embedding_std(z))
            record["rankme"] = float(rankme(z))
            record["emb_dim"] = int(z.shape[1])
        for k, v in sorted(acc["diag_sums"].items()):
            record[k] = float(v) / steps
        return record

    def fit(self) -> TrainResult:
        cfg = self.config
        total = cfg.total_steps
        det_before = torch.are_deterministic_algorithms_enabled()
        fill_before = torch.utils.deterministic.fill_uninitialized_memory
        if cfg.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            # deterministic mode also NaN-fills every new tensor (a debugging aid): ~13-19% of a CPU step, and
            # results do not depend on it since every buffer is written before it is read
            torch.utils.deterministic.fill_uninitialized_memory = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        try:
            return self._fit(total)
        finally:
            torch.use_deterministic_algorithms(det_before)
            torch.utils.deterministic.fill_uninitialized_memory = fill_before

    def _fit(self, total: int) -> TrainResult:
        cfg, rt = self.config, self.runtime
        self.method.on_train_start(total)
        start_epoch, start_step, acc = 0, 0, self._new_accumulators()
        resumed_from = None
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            start_epoch, start_step, acc = self._load(load_state(self.checkpoint_path))
            resumed_from = start_epoch * cfg.steps_per_epoch + start_step
            self._say(
                f"{cfg.desc}: resuming from step {resumed_from}/{total} "
                f"(epoch {start_epoch + 1}, batch {start_step}) of {self.checkpoint_path}"
            )
        self.method.train()
        bar = _progress(total, resumed_from or 0, cfg.desc, disable=not (cfg.progress and rt.is_main))
        try:
            for epoch in range(start_epoch, cfg.epochs):
                skip = start_step if epoch == start_epoch else 0
                if skip == 0:
                    acc = self._new_accumulators()
                    if hasattr(self.method, "on_epoch_start"):
                        self.method.on_epoch_start(epoch, self.dataset_pass)
                self._end_epoch(epoch, self._train_epoch(epoch, skip, acc, bar, total))
        finally:
            bar.close()
        return TrainResult(history=self.history, summary=self._summary(), resumed_from_step=resumed_from)

    def _train_epoch(self, epoch: int, skip: int, acc: dict[str, Any], bar, total: int) -> dict[str, Any]:
        """Steps ``skip..steps_per_epoch`` of ``epoch`` (the first ``skip`` batches are drawn and dropped: the
        interrupted run trained on them), with the mid-epoch checkpoints; returns the epoch's accumulators."""
        cfg, rt = self.config, self.runtime
        data = DataStream(self.make_loader(epoch), _stream_seed(cfg.seed, epoch, rt.rank))
        for _ in range(skip):
            next(data)
        pending: list[tuple[int, int, torch.Tensor]] = []
        t0 = time.perf_counter()
        for step_in_epoch in range(skip, cfg.steps_per_epoch):
            step = epoch * cfg.steps_per_epoch + step_in_epoch
            views = self._next_views(data, epoch, step_in_epoch, acc)
            loss, out = self._train_step(self._to_device(views), step, total)
            self._add_loss(acc, pending, loss, step, epoch)
            acc["steps"] += 1
            acc["images"] += int(views[0].shape[0])
            self._accumulate(acc, out)
            bar.update(1)
            if (step + 1) % cfg.log_every_steps == 0:
                self._log_step(bar, epoch, step, loss, acc, t0)
            done_epoch = step_in_epoch + 1 == cfg.steps_per_epoch
            if cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0 and not done_epoch:
                self._check_finite(pending)
                acc["seconds"] += time.perf_counter() - t0
                self._save(epoch, step_in_epoch + 1, _portable(acc))
                t0 = time.perf_counter()
        self._check_finite(pending)
        acc["seconds"] += time.perf_counter() - t0
        data.close()
        return _portable(acc)

    def _next_views(self, data: DataStream, epoch: int, step_in_epoch: int, acc: dict[str, Any]) -> list:
        """The next batch's views (made here from the uint8 images when the Trainer has ``views``); the time spent
        waiting on the loader is added to ``acc``."""
        waited = time.perf_counter()
        try:
            views, _labels, *keys = next(data)
        except StopIteration:
            raise TrainingError(
                f"the loader of epoch {epoch + 1} ended after {step_in_epoch} batches; "
                f"expected {self.config.steps_per_epoch}"
            ) from None
        acc["data_wait"] = acc.get("data_wait", 0.0) + time.perf_counter() - waited
        if self.views is not None:
            views = self._make_views(views, epoch, epoch * self.config.steps_per_epoch + step_in_epoch)
        elif isinstance(views, torch.Tensor):
            views = [views]
        if keys and getattr(self.method, "uses_dataset", False):
            self.method.on_batch(list(keys[0]))
        return list(views)

    def _add_loss(self, acc: dict[str, Any], pending: list, loss: torch.Tensor, step: int, epoch: int) -> None:
        if self.device.type == "cpu":  # the value is at hand: check every step
            value = float(loss)
            if not math.isfinite(value):
                self._check_finite([(step, epoch, loss)])
            acc["loss_sum"] += value
        else:  # reading a GPU value waits for the GPU: check every log_every_steps
            pending.append((step, epoch, loss))
            if len(pending) >= self.config.log_every_steps:
                self._check_finite(pending)
            acc["loss_sum"] += loss

    def _end_epoch(self, epoch: int, acc: dict[str, Any]) -> None:
        """The epoch's record (metrics, online kNN, collapse verdict) into the history and the log, then the
        epoch-end checkpoint; a fatal collapse stops here."""
        cfg, rt = self.config, self.runtime
        record = self._epoch_metrics(epoch, acc)
        if self.knn is not None and ((epoch + 1) % self.knn.every_epochs == 0 or epoch + 1 == cfg.epochs):
            if rt.is_main:
                record.update(self.knn(self.method.exported_backbone(), self.device))
        reasons = detect_collapse(
            record,
            cfg.monitor,
            dim=int(record.get("emb_dim", 0)),
            loss_level=getattr(self.method, "collapse_loss_level", None),
        )
        if rt.distributed:  # rank 0's verdict for everyone, so a fatal collapse stops every rank
            verdict = [reasons]
            dist.broadcast_object_list(verdict, src=0)
            reasons = verdict[0]
        record["collapsed"] = bool(reasons)
        if reasons:
            record["collapse_reason"] = "; ".join(reasons)
        self.history.append(record)
        self._say(_format_epoch(cfg.desc, record, cfg.epochs))
        if reasons:
            self._say(
                f"{'!' * 72}\n!! COLLAPSE in {cfg.desc} after epoch {epoch + 1}: {'; '.join(reasons)}\n{'!' * 72}"
            )
        if rt.is_main and self.on_epoch_end is not None:
            self.on_epoch_end(record)
        self._save(epoch + 1, 0, self._new_accumulators())
        if reasons and cfg.monitor.fatal:
            raise CollapseError(epoch, reasons)

    def _train_step(self, views: list[torch.Tensor], step: int, total: int) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        self.method.before_step(step, total)
        with self._autocast():
            out = self.model(views)
        loss = out["loss"]
        if self.device.type == "cpu" and not math.isfinite(float(loss.detach())):
            return loss.detach(), out  # stop before a bad update reaches the weights (checked by the caller)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self._params(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self._params(), cfg.grad_clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.method.after_step(step, total)
        return loss.detach(), out

    def _accumulate(self, acc: dict[str, Any], out: Mapping[str, Any]) -> None:
        emb = out.get("embedding")
        if isinstance(emb, torch.Tensor) and emb.dim() == 2:
            kept = acc["embeddings"]
            kept.append(emb.detach().float().cpu() if self.device.type == "cpu" else emb.detach().float())
            rows = sum(e.shape[0] for e in kept)
            while kept and rows - kept[0].shape[0] >= self.config.monitor.samples:
                rows -= kept.pop(0).shape[0]
        sums = acc["diag_sums"]
        for k, v in out.items():
            if k in ("loss", "embedding"):
                continue
            s = _scalar(v)
            if s is not None:
                sums[k] = sums.get(k, 0.0) + (float(s) if self.device.type == "cpu" else s)

    def _log_step(self, bar: Any, epoch: int, step: int, loss: torch.Tensor, acc: dict[str, Any], t0: float) -> None:
        if not self.runtime.is_main:
            return
        elapsed = acc["seconds"] + (time.perf_counter() - t0)
        ips = acc["images"] * self.runtime.world_size / elapsed if elapsed > 0 else 0.0
        value = float(loss)
        bar.set_postfix_str(f"epoch {epoch + 1}/{self.config.epochs} loss {value:.4f} img/s {ips:.0f}", refresh=False)
        if self.on_log is not None:
            self.on_log(
                step + 1,
                {
                    "train/loss": value,
                    "train/lr": float(self.optimizer.param_groups[0]["lr"]),
                    "train/images_per_s": ips,
                },
            )

    def _summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        seconds = sum(r.get("epoch_seconds", 0.0) for r in self.history)
        images = sum(r.get("images_per_s", 0.0) * r.get("epoch_seconds", 0.0) for r in self.history)
        summary = {
            "epochs": len(self.history),
            "steps": self.config.total_steps,
            "train_seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else float("nan"),
            "data_wait_seconds": sum(r.get("data_wait_seconds", 0.0) for r in self.history),
            "world_size": self.runtime.world_size,
            "device": str(self.device.type),
            "collapsed": any(r.get("collapsed") for r in self.history),
        }
        for k in ("loss", "lr", "emb_std", "rankme", "knn_top1"):
            if k in last:
                summary[f"final_{k}"] = last[k]
        knn = [r["knn_top1"] for r in self.history if "knn_top1" in r]
        if knn:
            summary["best_knn_top1"] = max(knn)
        return summary

    def _say(self, msg: str) -> None:
        if self.runtime.is_main:
            _write_line(msg)


def _portable(acc: dict[str, Any]) -> dict[str, Any]:
    """Accumulators as plain numbers/CPU tensors (they go into checkpoints)."""
    return {
        "loss_sum": float(acc["loss_sum"]),
        "steps": int(acc["steps"]),
        "images": int(acc["images"]),
        "seconds": float(acc["seconds"]),
        "data_wait": float(acc.get("data_wait", 0.0)),
        "diag_sums": {k: float(v) for k, v in acc["diag_sums"].items()},
        "embeddings": [e.detach().cpu() for e in acc["embeddings"]],
    }


def _format_epoch(desc: str, r: Mapping[str, Any], epochs: int) -> str:
    parts = [f"{desc} epoch {r['epoch']}/{epochs}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3g}"]
    for k, fmt in (("emb_std", ".4f"), ("rankme", ".1f"), ("knn_top1", ".3f"), ("images_per_s", ".0f")):
        if k in r:
            parts.append(f"{k} {r[k]:{fmt}}")
    return "  ".join(parts)


def _write_line(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr, flush=True)


def _progress(total: int, initial: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        file=sys.stderr,
        disable=disable,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
    )


__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainResult",
    "MonitorConfig",
    "KnnMonitor",
    "Runtime",
    "DataStream",
    "TrainingError",
    "NonFiniteLossError",
    "CollapseError",
    "setup_runtime",
    "teardown_runtime",
    "select_device",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "save_state",
    "load_state",
    "detect_collapse",
]
