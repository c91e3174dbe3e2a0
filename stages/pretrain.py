"""pretrain@<method>: data/shards -> runs/<method>/ (one SSL run, resumable, monitored, tracked).

    python -m stages.pretrain --method simclr
    torchrun --nproc_per_node=2 -m stages.pretrain --method simclr     # DDP: gloo on CPU, NCCL on GPU

Outputs (rank 0): runs/<method>/checkpoint.pt (final: backbone_state, backbone_config, method, family, hparams,
augment, summary, lineage, and the full method state), metrics.json (summary), history.tsv (one row per epoch),
config.json (the resolved configuration) and lineage.json: content only, so a re-run on the same shards, params
and code (same hardware) writes the same bytes and the DVC hash of runs/ stays. What differs from run to run (time,
commit, wandb run id, seconds, images/s and seconds waited on the loader per epoch, the step a run resumed from)
goes to
provenance/pretrain/<method>.json, which no stage depends on.

Resume. While training, a checkpoint goes to .sslcook/resume/<method>/<key>.pt every
``checkpoint_every_steps`` steps and at each epoch end. DVC deletes a stage's outputs before running it, so the
resume state lives outside them; its key is a digest of everything that determines the weights (resolved
config, shard manifest, world size, the code of ssl_models and this stage), so a run is never resumed across a
change of params, data or code. Running the same command (or ``dvc repro``) after a crash or a kill resumes
where the last checkpoint left off and ends with the same weights as an uninterrupted run (CPU). A state that
cannot be resumed (unreadable, another format, another model) is renamed ``<key>.pt.bad-<UTC time>`` and the run
starts fresh or stops (``pretrain.on_bad_resume``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .workspace.common import (
    ConfigError,
    DataError,
    SslcookError,
    atomic_path,
    ensure_writable,
    manifest_image_size,
    run_main,
    stop_on_sigterm,
    workspace,
    write_json,
)
from .workspace.config import Params, load_params
from .workspace.config.pretrain import PretrainConfig, resolve_method
from .workspace.lineage import digest, git_info, make_record, run_provenance, sha256_file, write_provenance

SHARDS_DIR = Path("data") / "shards"
MANIFEST = SHARDS_DIR / "manifest.json"
RESUME_DIR = Path(".sslcook") / "resume"
HISTORY_COLUMNS = ("epoch", "step", "loss", "lr", "emb_std", "rankme", "collapsed")
# measurements of one run, not of the weights: they live in the run's provenance, never in the hashed outputs
RUN_TIMING = ("train_seconds", "images_per_s", "epoch_seconds", "data_wait_seconds", "resumed_from_step")
# knobs that change no weight: a resume state stays valid when only these change
# (the layout is keyed as world_size and nodes; shards by their manifest)
_NOT_IN_RESUME_KEY = (
    "wandb",
    "monitor",
    "log_every_steps",
    "checkpoint_every_steps",
    "on_bad_resume",
    "processes",
    "nodes",
    "rdzv_endpoint",
    "rdzv_id",
    "node_rank",
    "shards_url",
)


def run_dir(method: str) -> Path:
    return Path("runs") / method


def resume_path(method: str, key: str) -> Path:
    return RESUME_DIR / method / f"{key[:20]}.pt"


# the library files a run's weights depend on: the stage's ssl_models deps in dvc.yaml (tests/test_params.py
# checks they agree); methods/dino.py: iBOT extends DINO and SwAV uses its multi-crop forward
LIBRARY_DEPS = (
    "engine.py",
    "device.py",
    "files.py",
    "data.py",
    "augment.py",
    "backbones.py",
    "heads.py",
    "optim.py",
    "distributed.py",
    "monitors.py",
    "evaluation.py",
    "registry.py",
    "methods/base.py",
    "methods/dino.py",
)


def code_files(method_cls: type) -> list[Path]:
    import inspect

    import ssl_models

    package = Path(ssl_models.__file__).parent
    return (
        [package / name for name in LIBRARY_DEPS]
        + [Path(inspect.getfile(method_cls))]
        + [Path(__file__), Path(inspect.getfile(PretrainConfig))]
    )


def code_digest(method_cls: type) -> str:
    """sha256 over the code a run depends on: a resume never mixes two versions of it."""
    h = hashlib.sha256()
    for f in code_files(method_cls):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _where(name: str, block: dict[str, Any], key: str) -> str:
    """The params key a value came from: the method's block when it sets it, else the common block."""
    return f"method.{name}.{key}" if key in block else f"pretrain.{key}"


def _augment_key(name: str, block: dict[str, Any], key: str) -> str:
    own = block.get("augment")
    return f"method.{name}.augment.{key}" if isinstance(own, dict) and key in own else f"pretrain.augment.{key}"


def views_or_config_error(
    name: str, block: dict[str, Any], recipe: str, image_size: int, channels: int, grey: str, strengths: dict[str, Any]
):
    """``build_views`` of a method's merged augment block; a bad value is a ConfigError naming its own key
    (``pretrain.augment.X`` or ``method.<name>.augment.X``, wherever the value came from)."""
    from ssl_models.augment import build_views

    def build(**chosen):
        views = build_views(recipe, image_size=image_size, channels=channels, grey=grey, **chosen)
        import torch

        # values checked only when used: one batch of one image, as training calls it
        views(torch.zeros(1, channels, image_size, image_size, dtype=torch.uint8), torch.Generator().manual_seed(0))
        return views

    refused = (ValueError, TypeError, RuntimeError, IndexError)
    try:
        return build(**strengths)
    except refused as exc:
        # the views refuse values one strength at a time: the first key refused on its own is the culprit
        for key in strengths:
            try:
                build(**{key: strengths[key]})
            except refused as own:
                got = "" if repr(strengths[key]) in str(own) else f" (got {strengths[key]!r})"
                raise ConfigError(f"params.yaml: {_augment_key(name, block, key)}: {own}{got}") from None
        raise ConfigError(f"params.yaml: {_where(name, block, 'augment')}: {exc}") from None


class Run:
    """Everything one pretrain run resolves before training (built on every rank, identically)."""

    def __init__(self, params: Params, name: str, root: Path, world_size: int, *, verify: bool = True):
        """``verify=False`` (:func:`check_params`): resolve without the shards, which may not exist yet."""
        from ssl_models import registry
        from ssl_models.data import MODE_CHANNELS

        self.params, self.name, self.root = params, name, root
        try:
            self.spec = registry.get(name)
        except KeyError as exc:
            raise ConfigError(f"--method: {exc.args[0]}") from None
        self.block = params.method.get(name) or {}
        self.cfg, self.hparams = resolve_method(params, name)
        self.world_size = world_size
        self.nodes = world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        self.shards = self.cfg.shards_url or root / SHARDS_DIR  # a URL: each shard verified as it streams
        manifest_path = root / MANIFEST
        if not verify:
            try:
                self.manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                self.manifest = {"image_mode": params.data.image_mode}
            self.manifest_sha256 = None
        elif not self.cfg.shards_url and not manifest_path.is_file():
            raise DataError(f"{MANIFEST}: not found (run the shard stage first: dvc repro shard)")
        else:
            from ssl_models.data import DataError as LoaderError
            from ssl_models.data import read_manifest, verify_shards

            try:
                self.manifest = (
                    read_manifest(self.shards) if self.cfg.shards_url else verify_shards(self.shards, splits=["train"])
                )
            except LoaderError as exc:
                raise DataError(str(exc)) from None
            self.manifest_sha256 = digest(self.manifest) if self.cfg.shards_url else sha256_file(manifest_path)
        self.verify = verify
        self.channels = MODE_CHANNELS.get(self.manifest.get("image_mode"), 3)
        if getattr(self.spec.cls, "needs_colour", False) and self.channels != 3:
            raise ConfigError(
                f"params.yaml: data.image_mode: {name} predicts colour, the shards are "
                f"{self.manifest.get('image_mode')} (grey); shard RGB data (data.image_mode: RGB)"
            )
        self._resolve_views()
        self._resolve_backbone()
        self._resolve_optimizer()

    # -- resolution
    def _resolve_views(self) -> None:
        aug = dict(self.cfg.augment)
        self.recipe = aug.pop("recipe", None) or self.spec.cls.augment
        self.grey = aug.pop("grey", "skip")
        size = aug.pop("image_size", None) or self.cfg.loader_image_size or manifest_image_size(self.manifest)
        if not size and not self.verify:  # shards not made yet: any size checks the values
            size = self.params.shard.image_size or 32
        if not size:
            raise ConfigError(
                f"params.yaml: {_where(self.name, self.block, 'augment')}.image_size: the shard manifest "
                f"gives no image size; set it"
            )
        self.image_size = int(size)
        self.strengths = aug
        self.views = views_or_config_error(
            self.name, self.block, self.recipe, self.image_size, self.channels, self.grey, aug
        )

    def eval_transform(self):
        """The deterministic transform of evaluation (resize, normalise with the views' statistics)."""
        from ssl_models.augment import build_eval_transform

        return build_eval_transform(
            image_size=self.image_size,
            channels=self.channels,
            grey=self.grey,
            mean=self.strengths.get("mean"),
            std=self.strengths.get("std"),
        )

    def _resolve_backbone(self) -> None:
        bb = dict(self.cfg.backbone or self.spec.cls.default_backbone)
        if "name" not in bb:
            raise ConfigError(f"params.yaml: {_where(self.name, self.block, 'backbone')}.name: missing")
        bb.setdefault("in_chans", self.views.out_channels)
        bb.setdefault("image_size", self.image_size)
        self.backbone_kwargs = bb

    def _resolve_optimizer(self) -> None:
        recipe = dict(self.spec.cls.optimizer)
        c = self.cfg
        for key, value in (
            ("name", c.optimizer),
            ("base_lr", c.base_lr),
            ("weight_decay", c.weight_decay),
            ("momentum", c.momentum),
            ("warmup_epochs", c.warmup_epochs),
            ("lr_scaling", c.lr_scaling),
        ):
            if value is not None:
                recipe[key] = value
        recipe.setdefault("lr_scaling", "linear")
        recipe.setdefault("warmup_epochs", 0)
        self.optimizer_recipe = recipe
        self.effective_batch = c.batch_size * self.world_size

    def resolved(self) -> dict[str, Any]:
        """The configuration this run trains with (config.json, the wandb config, the lineage params)."""
        return {
            "method": self.name,
            "family": self.spec.family,
            "seed": self.params.seed,
            "pretrain": self.cfg.model_dump(),
            "hparams": self.hparams,
            "backbone": self.backbone_kwargs,
            "augment": self.views.config,
            "optimizer": self.optimizer_recipe,
            "effective_batch": self.effective_batch,
            "world_size": self.world_size,
            "nodes": self.nodes,
        }

    def resume_key(self) -> str:
        resolved = self.resolved()
        resolved["pretrain"] = {k: v for k, v in resolved["pretrain"].items() if k not in _NOT_IN_RESUME_KEY}
        return digest(
            {"resolved": resolved, "manifest_sha256": self.manifest_sha256, "code": code_digest(self.spec.cls)}
        )

    # -- building
    def build(self):
        """(method, optimizer, scheduler) seeded from params.seed."""
        from ssl_models.backbones import build_backbone
        from ssl_models.engine import seed_everything
        from ssl_models.optim import build_optimizer

        seed_everything(self.params.seed)
        try:
            backbone = build_backbone(**self.backbone_kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"params.yaml: {_where(self.name, self.block, 'backbone')}: {exc}") from None
        try:
            method = self.spec.cls(backbone, **self.hparams)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"params.yaml: method.{self.name}: {exc}") from None
        try:
            optimizer = build_optimizer(method, self.optimizer_recipe, self.effective_batch)
        except ValueError as exc:
            raise ConfigError(f"params.yaml: pretrain (optimizer of {self.name}): {exc}") from None
        return method, optimizer

    def scheduler(self, optimizer, steps_per_epoch: int):
        from ssl_models.optim import build_scheduler

        total = self.cfg.epochs * steps_per_epoch
        warmup = int(round(float(self.optimizer_recipe.get("warmup_epochs", 0)) * steps_per_epoch))
        return build_scheduler(
            optimizer, total_steps=total, warmup_steps=min(warmup, total), final_lr_ratio=self.cfg.final_lr_ratio
        )


def resume_problem(path: Path, method, steps_per_epoch: int, world_size: int) -> str | None:
    """Why the resume state at ``path`` cannot be resumed (None: it can): unreadable, not a training state of
    this format, or of another architecture or schedule. Read with weights_only: nothing in it can run code."""
    from ssl_models import engine

    from .workspace.common import describe_exception

    try:
        state = engine.load_state(path)
    except Exception as exc:  # garbage, truncated, a pickle with code: torch says which
        return f"unreadable ({describe_exception(exc)})"
    if not isinstance(state, dict) or state.get("format") != engine.STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        return f"not a training state of format {engine.STATE_FORMAT!r} (found {found!r})"
    pos, weights = state.get("position"), state.get("method_state")
    keys = ("epoch", "step_in_epoch", "global_step", "steps_per_epoch", "world_size")
    if not isinstance(pos, dict) or not all(isinstance(pos.get(k), int) for k in keys) or not isinstance(weights, dict):
        return "incomplete training state (no position or weights)"
    if (pos["steps_per_epoch"], pos["world_size"]) != (steps_per_epoch, world_size):
        return (
            f"saved with {pos['steps_per_epoch']} steps/epoch on {pos['world_size']} process(es), now "
            f"{steps_per_epoch} on {world_size}"
        )
    expected = {k: tuple(v.shape) for k, v in method.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    if expected != found:
        other = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        return f"weights of another model (e.g. {other[0]})"
    return None


def set_aside_bad_resume(path: Path, method, steps_per_epoch: int, world_size: int, policy: str, name: str) -> None:
    """A resume state that cannot be resumed is renamed ``<file>.bad-<UTC time>`` (kept for a look, never read
    again), then training starts fresh (``pretrain.on_bad_resume: fresh``) or stops (``fail``)."""
    if not path.exists():
        return
    problem = resume_problem(path, method, steps_per_epoch, world_size)
    if problem is None:
        return
    import time

    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, aside)
    what = f"pretrain {name}: resume state {path}: {problem}; moved to {aside.name}"
    if policy == "fail":
        raise DataError(f"{what} (pretrain.on_bad_resume: fail; run again to start from step 0)")
    print(f"warning: {what}; starting from step 0 (pretrain.on_bad_resume: fresh)", file=sys.stderr)


def check_params(root: Path) -> Params:
    """Validate params.yaml as far as the stages will read it, before DVC starts one: every section and method
    block, and each listed method's views, backbone, method and optimizer built once (no data needed). DVC
    deletes a stage's outputs before running it, so a value the stage would refuse must be caught here."""
    params = load_params(root / "params.yaml")
    for name in params.methods:
        Run(params, name, root, 1, verify=False).build()
    return params


def _knn_monitor(run: Run, cfg: PretrainConfig):
    """The online kNN monitor on the labelled splits (None when off or when there are no labels)."""
    knn = cfg.monitor.online_knn
    if knn.every_epochs <= 0:
        return None
    from ssl_models.data import DataError as LoaderError
    from ssl_models.data import load_split
    from ssl_models.engine import KnnMonitor

    try:
        bank_x, bank_y, _ = load_split(run.root / SHARDS_DIR, "train", resize=cfg.loader_image_size)
        query_x, query_y, _ = load_split(run.root / SHARDS_DIR, "test", resize=cfg.loader_image_size)
    except LoaderError as exc:
        print(f"pretrain {run.name}: online kNN off ({exc})", file=sys.stderr)
        return None
    transform = run.eval_transform()
    return KnnMonitor(
        bank_x[: knn.bank_size],
        bank_y[: knn.bank_size],
        query_x[: knn.query_size],
        query_y[: knn.query_size],
        transform=transform,
        every_epochs=knn.every_epochs,
        k=knn.k,
        temperature=knn.temperature,
    )


class Tracker:
    """wandb on rank 0 (mode offline | online | disabled from params); a no-op when disabled."""

    def __init__(self, run: Run, record: dict[str, Any], run_id: str | None):
        self.wb = None
        self.run_id = run_id
        cfg = run.cfg.wandb
        if cfg.mode == "disabled":
            return
        import uuid

        import wandb

        # wandb's files stay in the workspace's .wandb/ unless the environment says otherwise (the Makefile does)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or run.root / ".wandb")
        for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            os.environ.setdefault(var, str(wandb_dir / sub))
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        config = {
            "params": run.params.model_dump(),
            "resolved": run.resolved(),
            "lineage": record,
            "provenance": run_provenance(run.root),
        }
        try:
            self.wb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                id=self.run_id,
                resume="allow",
                mode=cfg.mode,
                dir=str(wandb_dir),
                name=f"pretrain-{run.name}",
                group="pretrain",
                job_type="pretrain",
                tags=[run.name, run.spec.family, *cfg.tags],
                config=config,
                allow_val_change=True,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except Exception as exc:  # noqa: BLE001 - tracking must not kill a training run
            print(
                f"pretrain {run.name}: wandb disabled ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                file=sys.stderr,
            )
            self.wb = None

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.wb is not None:
            self.wb.log({k: v for k, v in values.items() if isinstance(v, (int, float, bool))}, step=step)

    def finish(self, summary: dict[str, Any], checkpoint: Path, name: str, record: dict[str, Any]) -> None:
        if self.wb is None:
            return
        import wandb

        for k, v in summary.items():
            if isinstance(v, (int, float, bool, str)):
                self.wb.summary[k] = v
        artifact = wandb.Artifact(
            f"{name}-checkpoint",
            type="model",
            metadata={
                "method": name,
                "data_version": record.get("data_version"),
                "params_digest": record.get("params_digest"),
                "git": git_info(checkpoint.parent),
            },
        )
        artifact.add_reference(checkpoint.resolve().as_uri())
        self.wb.log_artifact(artifact)
        self.wb.finish()

    def close(self) -> None:
        if self.wb is not None:
            self.wb.finish(exit_code=1)


def _history_tsv(history: list[dict[str, Any]]) -> str:
    extra = sorted(
        {
            k
            for r in history
            for k, v in r.items()
            if k not in HISTORY_COLUMNS
            and k not in RUN_TIMING
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
    )
    columns = list(HISTORY_COLUMNS) + extra

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    lines = ["\t".join(columns)] + ["\t".join(cell(r.get(c)) for c in columns) for r in history]
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def split_timing(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(content, timing): a summary or history row without and with only the RUN_TIMING keys."""
    return (
        {k: v for k, v in values.items() if k not in RUN_TIMING},
        {k: v for k, v in values.items() if k in RUN_TIMING},
    )


class Batches:
    """The train split as the Trainer reads it: this rank's uint8 batches per epoch (decode only: the Trainer
    makes the views on the device) and, for methods with ``uses_dataset``, one unshuffled pass with the
    evaluation transform."""

    def __init__(self, run: Run, runtime, seed: int):
        from ssl_models.data import shard_urls

        self.run, self.runtime, self.seed = run, runtime, seed
        self.urls = shard_urls(run.shards, "train")
        self.uses_dataset = bool(getattr(run.spec.cls, "uses_dataset", False))

    def __call__(self, epoch: int):
        from ssl_models.data import make_loader

        cfg, rt = self.run.cfg, self.runtime
        return make_loader(
            self.urls,
            batch_size=cfg.batch_size,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=self.seed,
            epoch=epoch,
            rank=rt.rank,
            world_size=rt.world_size,
            num_workers=cfg.num_workers,
            manifest=self.run.manifest,
            return_keys=self.uses_dataset,
            pin_memory=rt.device.type == "cuda",
            resize=cfg.loader_image_size,
        )

    def dataset_pass(self):
        """This rank's share of the train split, each image once, unshuffled, as ``([x], labels, keys)``."""
        from ssl_models.data import make_loader

        run, rt = self.run, self.runtime
        transform = run.eval_transform()
        batches = make_loader(
            self.urls,
            batch_size=run.cfg.batch_size,
            shuffle_buffer=0,
            rank=rt.rank,
            world_size=rt.world_size,
            num_workers=0,
            manifest=run.manifest,
            drop_last=False,
            return_keys=True,
            resize=run.cfg.loader_image_size,
        )
        return (([transform(images)], labels, keys) for images, labels, keys in batches)

    def steps_per_epoch(self) -> int:
        from ssl_models.data import DataError as LoaderError

        run = self.run
        too_big = ConfigError(
            f"params.yaml: {_where(run.name, run.block, 'batch_size')}: {run.cfg.batch_size} x "
            f"{self.runtime.world_size} process(es) is more than the train split can fill "
            f"({run.manifest['splits']['train'].get('count')} images)"
        )
        try:
            steps = len(self(0))
        except LoaderError as exc:
            raise (too_big if "batch" in str(exc) else DataError(str(exc))) from None
        if steps == 0:
            raise too_big
        return steps


def prepare_resume(root: Path, name: str, key: str, method, steps_per_epoch: int, runtime, cfg) -> Path:
    """The resume state's path under ``key``; rank 0 checks the outputs are writable, drops states no run can
    resume (another key: params, data or code changed; a save cut short by a kill) and sets aside a bad one."""
    state_path = root / resume_path(name, key)
    if runtime.is_main:
        ensure_writable(root / run_dir(name))  # before training: a read-only or full disk found now
        ensure_writable(state_path.parent)
        for stale in (root / RESUME_DIR / name).glob("*.pt"):
            if stale != state_path:
                stale.unlink(missing_ok=True)
        for torn in (root / RESUME_DIR / name).glob(".*.tmp"):
            torn.unlink(missing_ok=True)
        gitignore = root / RESUME_DIR.parent / ".gitignore"
        if not gitignore.exists():
            gitignore.parent.mkdir(parents=True, exist_ok=True)
            gitignore.write_text("*\n")
        set_aside_bad_resume(state_path, method, steps_per_epoch, runtime.world_size, cfg.on_bad_resume, name)
    if runtime.distributed:  # every rank sees the state only once rank 0 has judged it
        import torch.distributed as dist

        dist.barrier()
    return state_path


def make_trainer(run: Run, runtime, batches: Batches, method, optimizer, steps_per_epoch: int, state_path: Path):
    from ssl_models import engine

    cfg = run.cfg
    train_cfg = engine.TrainConfig(
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        seed=run.params.seed,
        grad_clip=cfg.grad_clip,
        precision=cfg.precision,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
        deterministic=cfg.deterministic,
        log_every_steps=cfg.log_every_steps,
        monitor=engine.MonitorConfig(**cfg.monitor.model_dump(exclude={"online_knn"})),
        desc=f"pretrain {run.name}",
    )
    return engine.Trainer(
        method,
        optimizer,
        scheduler=run.scheduler(optimizer, steps_per_epoch),
        config=train_cfg,
        make_loader=batches,
        runtime=runtime,
        checkpoint_path=state_path,
        knn=_knn_monitor(run, cfg),
        views=run.views,
        dataset_pass=batches.dataset_pass if batches.uses_dataset else None,
    )


def fit(trainer, name: str):
    """Train (resuming when a state is there); SIGTERM ends like Ctrl-C, the last checkpoint kept."""
    from ssl_models import engine
    from ssl_models.data import DataError as LoaderError

    try:
        with stop_on_sigterm():
            return trainer.fit()
    except engine.TrainingError as exc:  # non-finite losses and collapses included
        raise SslcookError(f"pretrain {name}: {exc}") from None
    except LoaderError as exc:
        raise DataError(str(exc)) from None


def final_checkpoint(run: Run, method, content: dict, history: list, record: dict, resolved: dict) -> dict[str, Any]:
    """The checkpoint export reads: the backbone with its config and the view recipe, plus the method's state."""
    return {
        "format": "sslcook-checkpoint/1",
        "method": run.name,
        "family": run.spec.family,
        "backbone_state": method.exported_backbone().state_dict(),
        "backbone_config": dict(method.exported_backbone().config),
        "hparams": run.hparams,
        "augment": dict(run.views.config, out_channels=run.views.out_channels),
        "optimizer": run.optimizer_recipe,
        "summary": _finite(content),
        "history": _finite(history),
        "lineage": record,
        "config": _finite(resolved),
        "method_state": method.state_dict(),
    }


def write_run(
    root: Path, run: Run, method, result, resolved: dict[str, Any], record: dict[str, Any], run_id: str | None
) -> tuple[dict[str, Any], Path]:
    """runs/<method>/: config, lineage, history.tsv, metrics and the final checkpoint (content only); the run's
    timings go to provenance. Returns (summary, checkpoint path)."""
    import torch

    from ssl_models import engine

    name = run.name
    summary = dict(
        result.summary,
        method=name,
        family=run.spec.family,
        effective_batch=run.effective_batch,
        resumed_from_step=result.resumed_from_step,
    )
    collapses = [r["epoch"] for r in result.history if r.get("collapsed")]
    summary["first_collapse_epoch"] = collapses[0] if collapses else None
    content, timing = split_timing(summary)
    history = [split_timing(r)[0] for r in result.history]
    out = root / run_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", _finite(resolved))
    write_json(out / "lineage.json", _finite(record))
    with atomic_path(out / "history.tsv") as tmp:
        tmp.write_text(_history_tsv(history))
    write_json(out / "metrics.json", _finite(content))
    engine.save_state(out / "checkpoint.pt", final_checkpoint(run, method, content, history, record, resolved))
    write_provenance(
        "pretrain",
        run_dir(name) / "checkpoint.pt",
        method=name,
        root=root,
        extra=_finite(
            {
                "wandb_run_id": run_id,
                "threads": torch.get_num_threads(),
                **timing,
                "epochs": [{"epoch": r.get("epoch"), **split_timing(r)[1]} for r in result.history],
            }
        ),
    )
    return summary, out / "checkpoint.pt"


def describe_run(run: Run, root: Path, key: str, optimizer, steps_per_epoch: int, runtime):
    """(the resolved config the run trains with, its lineage record)."""
    resolved = dict(
        run.resolved(),
        steps_per_epoch=steps_per_epoch,
        total_steps=run.cfg.epochs * steps_per_epoch,
        lr=optimizer.param_groups[0]["lr"],
        device=runtime.device.type,
    )
    extra = {"method": run.name, "family": run.spec.family, "manifest_sha256": run.manifest_sha256, "resume_key": key}
    record = make_record(
        "pretrain", params=resolved, parents={"shards": MANIFEST}, seed=run.params.seed, root=root, extra=extra
    )
    return resolved, record


def attach_tracker(trainer, run: Run, record: dict[str, Any], state_path: Path, runtime):
    """wandb on rank 0, continuing the interrupted run's id when resuming; returns (tracker or None, run id)."""
    run_id = ((trainer.resume_info() if state_path.exists() else None) or {}).get("extra", {}).get("wandb_run_id")
    tracker = None
    if runtime.is_main:
        tracker = Tracker(run, record, run_id)
        run_id = tracker.run_id
        trainer.on_epoch_end = lambda r: tracker.log(r, step=int(r["step"]))
        trainer.on_log = lambda step, values: tracker.log(values, step=step)
    trainer.extra_state.update(wandb_run_id=run_id, resume_key=record["resume_key"], lineage=record)
    return tracker, run_id


def _say_done(name: str, summary: dict[str, Any]) -> None:
    loss = summary.get("final_loss")
    print(
        f"pretrain {name}: {summary['epochs']} epochs, {summary['steps']} steps, "
        f"loss {loss if loss is None else round(loss, 4)}, {summary['images_per_s']:.0f} images/s, "
        f"{summary['train_seconds']:.0f}s -> {run_dir(name)}/",
        file=sys.stderr,
    )


def pretrain(name: str, root: Path | None = None) -> dict[str, Any] | None:
    """Train method ``name``; returns the summary on rank 0 (None on other ranks)."""
    root = root or workspace()
    params = load_params(root / "params.yaml")
    run = Run(params, name, root, int(os.environ.get("WORLD_SIZE", "1")))
    import torch

    from ssl_models import engine

    try:
        runtime = engine.setup_runtime(run.cfg.device)
    except engine.TrainingError as exc:
        raise ConfigError(f"params.yaml: {_where(name, run.block, 'device')}: {exc}") from None
    threads_before = torch.get_num_threads()
    if run.cfg.threads:
        torch.set_num_threads(run.cfg.threads)
    tracker, ok = None, False
    try:
        batches = Batches(run, runtime, params.seed)
        steps_per_epoch = batches.steps_per_epoch()
        method, optimizer = run.build()
        key = run.resume_key()
        state_path = prepare_resume(root, name, key, method, steps_per_epoch, runtime, run.cfg)
        trainer = make_trainer(run, runtime, batches, method, optimizer, steps_per_epoch, state_path)
        resolved, record = describe_run(run, root, key, optimizer, steps_per_epoch, runtime)
        tracker, run_id = attach_tracker(trainer, run, record, state_path, runtime)
        result = fit(trainer, name)
        if runtime.is_main:
            summary, checkpoint = write_run(root, run, method, result, resolved, record, run_id)
            tracker.finish(summary, checkpoint, name, record)
            tracker = None
            state_path.unlink(missing_ok=True)  # finished: the final checkpoint replaces the resume state
            _say_done(name, summary)
        ok = True
        return summary if runtime.is_main else None
    finally:
        if tracker is not None:
            tracker.close()
        torch.set_num_threads(threads_before)
        engine.teardown_runtime(runtime, barrier=ok)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="a registered method (see params.yaml methods)")
    args = parser.parse_args(argv)
    from .workspace.launch import launch_if_needed  # processes x nodes > 1: torchrun runs this same command

    root = workspace()
    try:
        cfg, _ = resolve_method(load_params(root / "params.yaml"), args.method)
    except KeyError as exc:
        raise ConfigError(f"--method: {exc.args[0]}") from None
    if not launch_if_needed(cfg, args.method, ["-m", "stages.pretrain", "--method", args.method]):
        pretrain(args.method)


if __name__ == "__main__":
    run_main(main)
