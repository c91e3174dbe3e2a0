"""Quality at equal budget: the same epochs of the project and of lightly's building blocks, then kNN (and probe).

    python -m bench.quality [--workload cifar10k|mnist5k] [--methods simclr byol vicreg mae] [--epochs 20]
                            [--stem standard|small] [--threads 2] [--tiny]

For each method both sides train ``--epochs`` epochs on the workload's train split (cifar10k: 10,000 images,
39 steps of 256 per epoch) from the same initial seed on batches drawn in the same order with the same view
recipe (the project's ``ssl_models.augment`` recipe of the method, made per batch as the engine makes it:
``bench.viewpath.view_maker``), the same optimizer recipe (the method's, with ``--warmup-epochs`` of linear warmup
then cosine; lightly's
side uses lightly's LARS and CosineWarmupScheduler) and the same head sizes (the project's defaults). The
project side trains through the project's engine (``ssl_models.engine.Trainer.fit``); lightly's side through
the loop of lightly's examples. Then the frozen backbone's features (eval transform: normalise only) give kNN
top-1 (k=200, weights exp(cos/0.1), the bank = the whole train split, queries = the test split), and for MAE a
linear probe (``ssl_models.evaluation.linear_probe``). Baselines: the randomly initialised backbone and raw
pixels, same kNN.

The default ``--epochs 20`` makes one ResNet-18 run about 10 minutes on 2 free CPU cores (lightly's SimCLR did 18
epochs in 7.4 min there); ``--workload mnist5k`` uses the default pipeline's settings (params.yaml: the width-16
ResNet-18 with the small-image stem and MAE's 6-block ViT, the per-method overrides, batch sizes, augment
strengths and epochs); lightly's side there puts lightly's heads and losses on the project's ResNet module (same
architecture) and builds lightly's MAE on a torchvision ViT of the same depth, patch size and pooling.
Writes bench/results/quality-<workload>.json and prints a markdown table.

Equal wall time instead of equal epochs: ``--seconds S`` times each side's first steps on its own data path and
gives it the whole epochs that fill S at that rate; ``--own-data-path`` puts lightly's side on lightly's own
transform per PIL image in ``--workers`` DataLoader workers (same images per batch, in the same order).

Side by side on one machine: the two sides can run at the same time, one process and one thread each, so both
see the same machine conditions (the kNN depends on the epochs, not on the threads), then be merged:

    python -m bench.quality --sides project --threads 1 --tag project &
    python -m bench.quality --sides lightly --threads 1 --tag lightly --skip-baselines &
    wait; python -m bench.quality --combine bench/results/quality-cifar10k-{project,lightly}.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, publish, table, write_results  # noqa: E402

QUALITY_METHODS = ("simclr", "byol", "vicreg", "mae")


def batches(
    images, labels, maker: Callable, *, batch_size: int, epoch: int, seed: int, device: str = "cpu"
) -> Iterator[tuple]:
    """One epoch of (views, labels): a seeded permutation, full batches only, the ViewMaker on each batch (on
    ``device``) with the project's seeding rule (``bench.viewpath.view_generator``)."""
    import torch

    from bench.viewpath import view_generator

    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for step, start in enumerate(range(0, len(order) - batch_size + 1, batch_size)):
        idx = order[start : start + batch_size]
        views = maker(images[idx].to(device, non_blocking=True), view_generator(seed, epoch, step, 0))
        yield views, labels[idx]


class _PilViews:
    """lightly's own data path on the in-memory workload: each uint8 image as a PIL image through lightly's
    transform for the method, in torch DataLoader workers (``bench.viewpath.lightly_views``)."""

    def __init__(self, images, labels, transform, mode: str) -> None:
        self.images, self.labels, self.transform, self.mode = images, labels, transform, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        array = self.images[i].permute(1, 2, 0).numpy()
        image = Image.fromarray(array[..., 0] if self.mode == "L" else array, self.mode)
        return self.transform(image), int(self.labels[i])


def own_batches(images, labels, transform, *, batch_size: int, epochs: int, seed: int, workers: int, channels: int):
    """``epochs`` epochs of (views, labels) from lightly's own data path, in the order :func:`batches` uses (the
    same seeded permutation per epoch, full batches only), from one DataLoader so its workers start once."""
    import torch

    from bench.viewpath import _collate

    order: list[int] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        order += perm[: len(perm) // batch_size * batch_size].tolist()
    return torch.utils.data.DataLoader(
        _PilViews(images, labels, transform, "L" if channels == 1 else "RGB"),
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        collate_fn=_collate,
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def pipeline_settings(method: str) -> dict[str, Any]:
    """The default pipeline's backbone, method overrides, augment strengths and schedule (params.yaml)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pre, block = params["pretrain"], dict(params["method"].get(method) or {})
    backbone = dict(block.pop("backbone", None) or pre["backbone"])
    augment = {**(pre.get("augment") or {}), **(block.pop("augment", None) or {})}
    schedule = {k: block.pop(k, pre.get(k)) for k in ("epochs", "batch_size", "warmup_epochs")}
    recipe = {k: block.pop(k) for k in ("optimizer", "base_lr", "weight_decay", "momentum", "lr_scaling") if k in block}
    for k in ("optimizer", "base_lr", "weight_decay", "momentum", "lr_scaling"):
        if pre.get(k) is not None and k not in recipe:
            recipe[k] = pre[k]
    if "optimizer" in recipe:
        recipe["name"] = recipe.pop("optimizer")
    return {"backbone": backbone, "hparams": block, "augment": augment, "recipe": recipe, **schedule}


def train_side(
    side: str,
    method: str,
    wl,
    *,
    epochs: int,
    batch_size: int,
    warmup_epochs: float,
    stem: str,
    seed: int,
    augment: dict[str, Any],
    hparams: dict[str, Any],
    recipe: dict[str, Any],
    backbone_cfg: dict[str, Any] | None,
    device: str,
    precision: str,
    own_data_path: bool = False,
    workers: int = 1,
    calibrate_steps: int = 0,
) -> dict[str, Any]:
    """Train one side ``epochs`` epochs; with ``calibrate_steps``, instead time that many steps (after one
    untimed) on the side's data path and return their images/s alone (the model is then thrown away)."""
    import torch

    from bench import steps
    from bench.viewpath import lightly_views, view_maker

    steps_per_epoch = len(wl.train_images) // batch_size
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    transform = view_maker(
        steps.method_class(method).augment, image_size=wl.image_size, channels=wl.channels, **augment
    )
    common = dict(
        stem=stem,
        image_size=wl.image_size,
        channels=wl.channels,
        total_steps=total,
        warmup_steps=warmup,
        batch_size=batch_size,
        device=device,
        precision=precision,
        overrides=hparams,
        recipe_overrides=recipe,
    )
    torch.manual_seed(seed)
    if calibrate_steps:
        return {
            "images_per_s": _calibrate(
                side, method, wl, transform, common, backbone_cfg, own_data_path, workers, calibrate_steps, seed
            )
        }
    start = time.perf_counter()
    losses: list[float] = []
    if side == "project":
        # backbone_cfg: the pipeline's own backbone (mnist5k)
        sided, trainer = steps.project_side(method, backbone_cfg=backbone_cfg, **common)
        trainer.config.epochs, trainer.config.steps_per_epoch = epochs, steps_per_epoch
        trainer.make_loader = lambda epoch: batches(
            wl.train_images, wl.train_labels, transform, batch_size=batch_size, epoch=epoch, seed=seed
        )
        result = trainer.fit()
        losses = [r["loss"] for r in result.history]
        backbone = sided.backbone
    else:
        sided = steps.lightly_side(method, backbone_cfg=backbone_cfg, **common)
        if own_data_path:
            own = lightly_views(method, image_size=wl.image_size, channels=wl.channels)
            stream = iter(
                own_batches(
                    wl.train_images,
                    wl.train_labels,
                    own,
                    batch_size=batch_size,
                    epochs=epochs,
                    seed=seed,
                    workers=workers,
                    channels=wl.channels,
                )
            )
        for epoch in range(epochs):
            epoch_losses = []
            epoch_batches = (
                (next(stream) for _ in range(steps_per_epoch))
                if own_data_path
                else batches(wl.train_images, wl.train_labels, transform, batch_size=batch_size, epoch=epoch, seed=seed)
            )
            for i, (views, _) in enumerate(epoch_batches):
                value = sided.step(views, epoch * steps_per_epoch + i)
                if not math.isfinite(value):
                    raise FloatingPointError(f"lightly {method}: non-finite loss at epoch {epoch + 1}")
                epoch_losses.append(value)
            losses.append(sum(epoch_losses) / len(epoch_losses))
            print(f"lightly {method} epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        backbone = sided.backbone
    seconds = time.perf_counter() - start
    return {
        "backbone": backbone,
        "train_seconds": seconds,
        "images_per_s": total * batch_size / seconds,
        "epoch_losses": losses,
        "steps": total,
    }


def _calibrate(side, method, wl, transform, common, backbone_cfg, own_data_path, workers, count, seed) -> float:
    """images/s of ``count`` steps (after one untimed) of a side's step on its own data path, each step waiting
    for its batch: what sets that side's epochs under a time budget."""
    from bench import steps
    from bench.viewpath import lightly_views

    bs = common["batch_size"]
    if side == "project":
        sided, _ = steps.project_side(method, backbone_cfg=backbone_cfg, **common)
        data = batches(wl.train_images, wl.train_labels, transform, batch_size=bs, epoch=0, seed=seed)
    else:
        sided = steps.lightly_side(method, backbone_cfg=backbone_cfg, **common)
        source = (
            own_batches(
                wl.train_images,
                wl.train_labels,
                lightly_views(method, image_size=wl.image_size, channels=wl.channels),
                batch_size=bs,
                epochs=max(1, math.ceil((count + 1) * bs / len(wl.train_images))),
                seed=seed,
                workers=workers,
                channels=wl.channels,
            )
            if own_data_path
            else batches(wl.train_images, wl.train_labels, transform, batch_size=bs, epoch=0, seed=seed)
        )
        data = iter(source)
    views, _ = next(data)
    sided.step(views, 0)
    start = time.perf_counter()
    for i in range(1, count + 1):
        views, _ = next(data)
        sided.step(views, i)
    rate = count * bs / (time.perf_counter() - start)
    del data
    return rate


def budget_epochs(seconds: float, images_per_s: float, images_per_epoch: int) -> int:
    """The whole epochs that fill ``seconds`` at ``images_per_s`` (at least one)."""
    return max(1, round(seconds * images_per_s / images_per_epoch))


def evaluate(backbone, wl, *, probe: bool, device: str) -> dict[str, float]:
    from ssl_models.augment import build_eval_transform
    from ssl_models.evaluation import extract_features, knn_evaluate, linear_probe

    transform = build_eval_transform(image_size=wl.image_size, channels=wl.channels)
    train = extract_features(backbone, wl.train_images, transform=transform, device=device, progress=False)
    test = extract_features(backbone, wl.test_images, transform=transform, device=device, progress=False)
    out = {
        "knn_top1": knn_evaluate(train, wl.train_labels, test, wl.test_labels, ks=(200,), temperature=0.1)[
            "knn_top1_k200"
        ]
    }
    if probe:
        out["linear_probe_top1"] = linear_probe(train, wl.train_labels, test, wl.test_labels, device=device)["top1"]
    return out


def baselines(wl, methods, *, stem: str, device: str, backbone_cfg=None) -> dict[str, Any]:
    import torch

    from bench import steps
    from ssl_models.evaluation import knn_evaluate, raw_pixel_features

    out: dict[str, Any] = {
        "raw_pixels": {
            "knn_top1": knn_evaluate(
                raw_pixel_features(wl.train_images),
                wl.train_labels,
                raw_pixel_features(wl.test_images),
                wl.test_labels,
                ks=(200,),
                temperature=0.1,
            )["knn_top1_k200"]
        }
    }
    kinds = sorted({"vit" if steps.is_vit_method(m) else "resnet" for m in methods})
    for kind in kinds:
        torch.manual_seed(0)
        method = "mae" if kind == "vit" else "simclr"
        if backbone_cfg is not None and kind == "resnet":
            bb = steps.project_backbone(method, stem, wl.image_size, wl.channels, backbone_cfg)
        else:
            bb = steps.project_backbone(method, stem, wl.image_size, wl.channels)
        out[f"random_init_{kind}"] = evaluate(bb, wl, probe=kind == "vit", device=device)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.workload import cifar10k, mnist5k

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.workload == "cifar10k":
        wl = cifar10k(args.archive, train_per_class=args.train_per_class, test_per_class=args.test_per_class)
    else:
        wl = mnist5k()
    results: dict[str, Any] = {
        "machine": machine(),
        "workload": wl.describe(),
        "settings": vars_clean(args),
        "methods": {},
    }
    results["baselines"] = (
        {}
        if args.skip_baselines
        else baselines(
            wl,
            args.methods,
            stem=args.stem,
            device=args.device,
            backbone_cfg=None if args.workload == "cifar10k" else pipeline_settings("simclr")["backbone"],
        )
    )
    for method in args.methods:
        results["methods"][method] = {}
        for side in args.sides:
            if args.workload == "mnist5k":
                ps = pipeline_settings(method)
                cfg = dict(
                    epochs=args.epochs or ps["epochs"],
                    batch_size=ps["batch_size"],
                    warmup_epochs=ps["warmup_epochs"],
                    augment=ps["augment"],
                    hparams=ps["hparams"],
                    recipe=ps["recipe"],
                    backbone_cfg=ps["backbone"],
                )
            else:
                cfg = dict(
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    warmup_epochs=args.warmup_epochs,
                    augment={},
                    hparams={},
                    recipe={},
                    backbone_cfg=None,
                )
            own = args.own_data_path and side == "lightly"
            extra = dict(
                own_data_path=own,
                workers=args.workers,
                stem=args.stem,
                seed=args.seed,
                device=args.device,
                precision=args.precision,
            )
            calibrated = None
            try:
                if args.seconds:
                    calibrated = train_side(side, method, wl, calibrate_steps=args.calibrate_steps, **extra, **cfg)[
                        "images_per_s"
                    ]
                    per_epoch = len(wl.train_images) // cfg["batch_size"] * cfg["batch_size"]
                    cfg["epochs"] = budget_epochs(args.seconds, calibrated, per_epoch)
                print(
                    f"== {method} / {side}: {cfg['epochs']} epochs"
                    + (f" ({args.seconds:.0f} s at a calibrated {calibrated:.1f} images/s)" if calibrated else ""),
                    file=sys.stderr,
                    flush=True,
                )
                trained = train_side(side, method, wl, **extra, **cfg)
                metrics = evaluate(trained.pop("backbone"), wl, probe=method == "mae", device=args.device)
                row = {**metrics, **trained, "epochs": cfg["epochs"], "data_path": _data_path(side, own)}
                if calibrated is not None:
                    row["calibrated_images_per_s"] = calibrated
            except (FloatingPointError, RuntimeError) as exc:
                row = {"error": str(exc).splitlines()[0], "epochs": cfg["epochs"]}
            results["methods"][method][side] = row
            print(f"   {method} / {side}: {row}", file=sys.stderr, flush=True)
            write_results(_name(args), results, args.results_dir)  # partial results survive an interruption
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _data_path(side: str, own: bool) -> str:
    if side == "project":
        return "project: batched ViewMaker per batch in the training process"
    if own:
        return "lightly: its own transform per PIL image in DataLoader workers"
    return "lightly: the project's batched views (the same batches as the project side)"


def vars_clean(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _name(args: argparse.Namespace) -> str:
    return f"quality-{args.workload}" + (f"-{args.tag}" if args.tag else "") + ("-tiny" if args.tiny else "")


def report(results: dict[str, Any]) -> str:
    rows = []
    for method, sides in results["methods"].items():
        p, l_ = sides.get("project", {}), sides.get("lightly", {})
        diff = p.get("knn_top1", float("nan")) - l_.get("knn_top1", float("nan"))
        rows.append(
            [
                method,
                f"{p.get('epochs', '-')} / {l_.get('epochs', '-')}",
                p.get("knn_top1", p.get("error", "-")),
                l_.get("knn_top1", l_.get("error", "-")),
                round(diff * 100, 1) if diff == diff else "-",
                p.get("linear_probe_top1", "-"),
                l_.get("linear_probe_top1", "-"),
                round(p.get("train_seconds", float("nan")) / 60, 1),
                round(l_.get("train_seconds", float("nan")) / 60, 1),
            ]
        )
    base = results["baselines"]
    text = table(
        [
            "method",
            "epochs (project / lightly)",
            "project kNN top-1",
            "lightly kNN top-1",
            "difference (points)",
            "project probe",
            "lightly probe",
            "project min",
            "lightly min",
        ],
        rows,
    )
    text += "\n\nbaselines: " + ", ".join(
        f"{k} kNN {v['knn_top1']:.3f}" + (f" probe {v['linear_probe_top1']:.3f}" if "linear_probe_top1" in v else "")
        for k, v in base.items()
    )
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("cifar10k", "mnist5k"), default="cifar10k")
    p.add_argument("--methods", nargs="+", default=list(QUALITY_METHODS))
    p.add_argument("--sides", nargs="+", default=["project", "lightly"], choices=("project", "lightly"))
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="cifar10k default 20 (about 10 min a run on 2 cores); mnist5k default: params.yaml pretrain.epochs",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="a time budget per side instead of equal epochs: each side's epochs = seconds x its calibrated "
        "images/s / images per epoch (whole epochs, at least 1)",
    )
    p.add_argument("--calibrate-steps", type=int, default=5, help="timed steps (after one untimed) of the calibration")
    p.add_argument(
        "--own-data-path",
        action="store_true",
        help="lightly's side makes its views with lightly's own transforms per PIL image in DataLoader workers "
        "(default: both sides train on the project's batched views)",
    )
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of lightly's own data path")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--stem", choices=("standard", "small"), default="standard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--archive", type=Path, default=None)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument(
        "--tiny", action="store_true", help="smoke mode: 16 train / 4 test images per class, batch 16, 1 epoch"
    )
    p.add_argument("--skip-baselines", action="store_true", help="no random-init / raw-pixel baselines")
    p.add_argument("--tag", default="", help="suffix of the results file name (runs split over processes)")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="merge results files of runs split over processes into quality-<workload>[-<tag>].json "
        "and print the table (no training)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        # tiny sizes where the command line gave none
        if args.train_per_class == 1000:
            args.train_per_class, args.test_per_class = 16, args.test_per_class or 4
        if args.batch_size == 256:
            args.batch_size = 16
        args.epochs = 1
    if args.epochs is None and args.workload == "cifar10k":
        args.epochs = 20
    return args


def combine(paths: list[Path], name: str, results_dir: Path | None) -> dict[str, Any]:
    """Merge results files of one workload written by runs split over processes (``--sides``/``--tag``): the
    methods' sides and the baselines of every file, each file's machine record kept under ``parts``."""
    import json

    merged: dict[str, Any] = {"methods": {}, "baselines": {}, "parts": []}
    workloads = set()
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"bench.quality --combine: cannot read {path}: {exc}") from None
        workloads.add(json.dumps(part.get("workload"), sort_keys=True))
        merged["parts"].append(
            {"file": Path(path).name, "machine": part.get("machine"), "settings": part.get("settings")}
        )
        merged["baselines"].update(part.get("baselines") or {})
        for method, sides in (part.get("methods") or {}).items():
            merged["methods"].setdefault(method, {}).update(sides)
    if len(workloads) != 1:
        raise SystemExit(f"bench.quality --combine: the files are of different workloads: {', '.join(map(str, paths))}")
    merged["workload"] = json.loads(workloads.pop())
    merged["machine"] = merged["parts"][0]["machine"]
    write_results(name, merged, results_dir)
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.combine:
        results = combine(args.combine, _name(args), args.results_dir)
        print(report(results))
        return 0
    publish(_name(args), run(args), args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
