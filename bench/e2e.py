"""End-to-end pretraining images/s per method: shards -> each side's own data path -> each side's training step.

    python -m bench.e2e [--methods simclr byol ...] [--workers 1] [--batch-size 256] [--steps 3] [--repeats 3]
                        [--threads 1] [--tiny] [--results-dir DIR]

Every registered method (``ssl_models.registry``), on cifar10k (10,000 32x32 RGB images) sharded by the project's
ingest + shard stages into a temporary workspace, at equal model, batch, torch threads and loader workers:

* **project**: the decode-only loader, the method's recipe as a ViewMaker on each batch (default strengths,
  ``view_generator(seed, epoch, step, rank)``), and the engine's step (``bench.steps.project_side``, under the
  engine's CPU settings);
* **lightly**: lightly's own transform for the method (``bench.viewpath.lightly_views``: SimCLRTransform,
  BYOLTransform, VICRegTransform, DINOTransform, SwaVTransform, MoCoV2Transform, SimSiamTransform, MAETransform, at
  32 px with the project's view counts) per PIL image in torch DataLoader workers, and the step assembled from
  lightly's building blocks (``bench.steps.lightly_side``).

Models as ``bench.throughput``: torchvision's ResNet-18 (standard stem) for every method but the ViT ones
(MAE, and the project-only I-JEPA, SimMIM and iBOT: ViT-Tiny patch 4). Methods lightly has no counterpart for
(the origins family, DeepCluster, I-JEPA, SimMIM, iBOT) get the project's figure alone. Each repeat builds a fresh
loader per side (epoch = repeat), runs one untimed step (worker start-up, allocations), then times ``--steps``
steps including the wait for each batch; sides alternate A/B, B/A; the figure is the median of the per-repeat
ratios project/lightly (target >= 1.3 on CPU).

Writes bench/results/e2e.json (e2e-tiny.json with --tiny).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, publish, table, write_results

# the step alone cannot train these: they need what only Trainer.fit runs around the steps
NOT_TIMED = {
    "deepcluster": "needs the per-epoch clustering pass over the dataset (Trainer.fit's dataset_pass): "
    "not timed step by step"
}


def registered() -> list[str]:
    import ssl_models.methods  # noqa: F401  (registers the methods)
    from ssl_models import registry

    return sorted(registry.names() if hasattr(registry, "names") else registry.available())


def backbone_for(method: str, image_size: int) -> dict[str, Any] | None:
    """None: bench.steps' choice (ResNet-18 / ViT-Tiny for MAE); ViT-Tiny patch 4 for project-only ViT methods."""
    from bench import steps

    if method in steps.METHODS:
        return None
    default = dict(steps.method_class(method).default_backbone)
    if default.get("name", "").startswith("vit"):
        return {**default, "name": "vit_tiny", "patch_size": 4, "image_size": image_size}
    return None


def timed_steps(batches, step, views_of, count: int) -> float:
    """One untimed step, then images/s over ``count`` steps (each waits for its batch, makes views, trains)."""
    it = iter(batches)
    batch = next(it)
    step(views_of(batch, 0), 0)
    images, start = 0, time.perf_counter()
    for i in range(1, count + 1):
        try:
            batch = next(it)
        except StopIteration:
            break
        step(views_of(batch, i), i)
        images += len(batch[1])
    seconds = time.perf_counter() - start
    del it
    return images / seconds if images else float("nan")


def build(method: str, side: str, urls: list[str], wl, args: argparse.Namespace):
    """(rate(repeat) -> images/s) of one side of one method."""
    import torch

    from bench import steps as S
    from bench import viewpath

    kw = {
        "image_size": wl.image_size,
        "channels": wl.channels,
        "batch_size": args.batch_size,
        "total_steps": 10_000,
        "stem": args.stem,
    }
    if side == "project":
        sided, _ = S.project_side(method, backbone_cfg=backbone_for(method, wl.image_size), **kw)
        maker = viewpath.view_maker(S.method_class(method).augment, image_size=wl.image_size, channels=wl.channels)

        def rate(repeat: int) -> float:
            S.engine_cpu_mode()
            loader = viewpath.decode_loader(urls, batch_size=args.batch_size, num_workers=args.workers, epoch=repeat)
            return timed_steps(
                loader, sided.step, lambda b, i: maker(b[0], viewpath.view_generator(0, repeat, i)), args.steps
            )
    else:
        sided = S.lightly_side(method, **kw)
        transform = viewpath.lightly_views(method, image_size=wl.image_size, channels=wl.channels)

        def rate(repeat: int) -> float:
            torch.use_deterministic_algorithms(False)
            loader = viewpath.sample_loader(
                urls, transform, pil=True, mode="RGB", batch_size=args.batch_size, num_workers=args.workers, seed=repeat
            )
            return timed_steps(loader, sided.step, lambda b, i: b[0], args.steps)

    return rate


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench import steps as S
    from bench import viewpath
    from bench.workload import cifar10k

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = cifar10k(train_per_class=8, test_per_class=1) if args.tiny else cifar10k()
    results: dict[str, Any] = {
        "machine": machine(),
        "workload": wl.describe(),
        "batched_path_in_tree": viewpath.batched(),
        "settings": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "workers": args.workers,
            "stem": args.stem,
            "backbone": f"torchvision ResNet-18 (width 64), {args.stem} stem; ViT methods: ViT-Tiny patch 4",
        },
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="sslcook-bench-e2e-") as tmp:
        urls = viewpath.train_urls(viewpath.make_shards(wl, Path(tmp)))
        for method in args.methods:
            sides = ["project", "lightly"] if method in S.METHODS else ["project"]
            entry: dict[str, Any] = {"sides": sides}
            if method in NOT_TIMED:
                results["methods"][method] = {**entry, "note": NOT_TIMED[method]}
                continue
            try:
                torch.manual_seed(0)
                rates = {s: build(method, s, urls, wl, args) for s in sides}
                runs: dict[str, list[float]] = {s: [] for s in sides}
                for r in range(args.repeats):
                    for s in sides if r % 2 == 0 else sides[::-1]:
                        runs[s].append(rates[s](r))
                    print(
                        f"{method} repeat {r + 1}/{args.repeats}: "
                        + ", ".join(f"{s} {v[-1]:.1f}" for s, v in runs.items()),
                        file=sys.stderr,
                        flush=True,
                    )
                entry["images_per_s"] = {s: median(v) for s, v in runs.items()}
                entry["runs"] = runs
                if "lightly" in runs:
                    entry["ratios"] = [p / q for p, q in zip(runs["project"], runs["lightly"])]
                    entry["ratio_project_over_lightly"] = median(entry["ratios"])
                else:
                    entry["note"] = "no lightly counterpart: the project's figure alone"
            except Exception as exc:  # one method's failure must not lose the others' figures
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{method}: {entry['error']}", file=sys.stderr, flush=True)
            results["methods"][method] = entry
            write_results(_name(args), results, args.results_dir)
    torch.use_deterministic_algorithms(False)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _name(args: argparse.Namespace) -> str:
    return "e2e-tiny" if args.tiny else "e2e"


def report(results: dict[str, Any]) -> str:
    rows = []
    for method, r in results["methods"].items():
        ips = r.get("images_per_s", {})
        rows.append(
            [
                method,
                ips.get("project", float("nan")),
                ips.get("lightly", float("nan")),
                r.get("ratio_project_over_lightly", float("nan")),
                ", ".join(f"{x:.2f}" for x in r.get("ratios", [])) or r.get("note", r.get("error", "")),
            ]
        )
    note = (
        ""
        if results["batched_path_in_tree"]
        else "\n(batched path not in this tree: the project's views are the per-sample ones, made in the training "
        "process)"
    )
    return (
        table(["method", "project img/s", "lightly img/s", "project/lightly (median)", "per repeat / note"], rows)
        + note
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--workers", type=int, default=1, help="loader workers per side (params.yaml's default: 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per repeat (after one untimed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stem", choices=("standard", "small"), default="standard")
    p.add_argument("--tiny", action="store_true", help="smoke mode: 80 images, batch 8, 1 step, 1 repeat")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    known = registered()
    args.methods = args.methods or known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
    if args.tiny:
        args.batch_size, args.steps, args.repeats = 8, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    publish(_name(args), run(args), args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
