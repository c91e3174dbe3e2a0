"""The data path alone (decode + every view of the recipe), CPU: batched vs per-sample vs lightly, and the step.

    python -m bench.datapath [--workloads mnist5k cifar10k] [--workers 0 2] [--repeats 3] [--batches 8]
                             [--batch-size 256] [--tiny] [--results-dir DIR]

Recipe: the default pipeline's SimCLR views (params.yaml ``method.simclr.augment`` merged over
``pretrain.augment``: crop scale 0.4-1, brightness/contrast 0.4, no blur, no flip, 10 degree rotation and 10%
shift), on mnist5k (4,000 28x28 grey digits) and cifar10k (10,000 32x32 RGB CIFAR-10 images). Both workloads are
sharded by the project's own ingest + shard stages (PNG) into a temporary workspace, and every side reads those
shards (``bench.viewpath``):

* **batched**: the project's decode-only loader (``--workers`` decode processes, uint8 batches) and the recipe's
  ViewMaker on each batch in this process (``view_generator(seed, epoch, step, rank)``), as the engine runs it;
* **per-sample**: ``bench.persample`` (the pre-batched torchvision path) per image in torch DataLoader workers;
* **lightly**: lightly's ``SimCLRTransform`` configured like the recipe (same crop scale, jitter, grayscale, blur,
  flip; the affine becomes lightly's random rotation: lightly has no shift) per PIL image in DataLoader workers.

Plus the default SimCLR training step (the project's engine step, ``bench.steps``, on the pipeline's backbone:
params.yaml ``pretrain.backbone``, the SimCLR hyperparameters, batch 256) on views of the same recipe. One torch
thread in this process, workers single-threaded. Each repeat times every (side, workers) pair and the step once,
in a rotated order; a rate is images/s over ``--batches`` batches after the first one (worker start-up and the
first shard's read are left out). The report gives the median over repeats of the per-repeat ratios:
batched / step (target >= 3), batched / lightly (target >= 3) and batched / per-sample.

Writes bench/results/datapath.json (datapath-tiny.json with --tiny).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, publish, table, write_results

SIDES = ("batched", "persample", "lightly")
WORKLOADS = ("mnist5k", "cifar10k")


def simclr_settings() -> dict[str, Any]:
    """The default pipeline's SimCLR: augment strengths, hyperparameters, optimizer recipe and backbone."""
    from bench.quality import pipeline_settings

    return pipeline_settings("simclr")


def load_workload(name: str, tiny: bool):
    from bench.workload import cifar10k, mnist5k

    if name == "mnist5k":
        return mnist5k(train_per_class=8, test_per_class=2) if tiny else mnist5k()
    return cifar10k(train_per_class=8, test_per_class=1) if tiny else cifar10k()


def timed_rate(batches, count: int, work: Callable[[Any, int], Any] | None = None) -> float:
    """Images/s over ``count`` batches after the first (``work(batch, i)`` runs on each, inside the timing)."""
    it = iter(batches)
    first = next(it)
    if work is not None:
        work(first, 0)
    images, start = 0, time.perf_counter()
    for i in range(count):
        try:
            batch = next(it)
        except StopIteration:
            break
        if work is not None:
            work(batch, i + 1)
        images += len(batch[1])
    seconds = time.perf_counter() - start
    del it
    return images / seconds if images else float("nan")


def build_sides(wl, shards: Path, settings: dict[str, Any], batch_size: int) -> dict[str, Callable[[int], float]]:
    """side -> rate(workers, count): images/s of that data path over the workload's shards."""
    from bench import viewpath
    from bench.persample import build_views as persample_views

    urls = viewpath.train_urls(shards)
    recipe, aug = "simclr", settings["augment"]
    size, channels = wl.image_size, wl.channels
    mode = "L" if channels == 1 else "RGB"
    maker = viewpath.view_maker(recipe, image_size=size, channels=channels, **aug)
    per_image = persample_views(recipe, image_size=size, channels=channels, **aug)
    lightly = viewpath.lightly_views("simclr", image_size=size, channels=channels, strengths=aug)

    def batched(workers: int, count: int) -> float:
        loader = viewpath.decode_loader(urls, batch_size=batch_size, num_workers=workers)
        return timed_rate(loader, count, lambda b, i: maker(b[0], viewpath.view_generator(0, 0, i, 0)))

    def persample(workers: int, count: int) -> float:
        return timed_rate(
            viewpath.sample_loader(urls, per_image, pil=False, mode=mode, batch_size=batch_size, num_workers=workers),
            count,
        )

    def lightly_side(workers: int, count: int) -> float:
        return timed_rate(
            viewpath.sample_loader(urls, lightly, pil=True, mode=mode, batch_size=batch_size, num_workers=workers),
            count,
        )

    return {"batched": batched, "persample": persample, "lightly": lightly_side}


def build_step(wl, settings: dict[str, Any], batch_size: int, steps: int) -> Callable[[], float]:
    """The default SimCLR training step (the project's engine step): images/s over ``steps`` steps."""
    import torch

    from bench import steps as S
    from bench import viewpath

    side, _ = S.project_side(
        "simclr",
        image_size=wl.image_size,
        channels=wl.channels,
        batch_size=batch_size,
        total_steps=10_000,
        overrides=settings["hparams"],
        recipe_overrides=settings["recipe"],
        backbone_cfg=settings["backbone"],
    )
    S.engine_cpu_mode()
    maker = viewpath.view_maker("simclr", image_size=wl.image_size, channels=wl.channels, **settings["augment"])
    idx = torch.arange(batch_size) % len(wl.train_images)
    views = maker(wl.train_images[idx], viewpath.view_generator(0, 0, 0, 0))
    side.step(views, 0)  # warm-up
    counter = [1]

    def rate() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            side.step(views, counter[0])
            counter[0] += 1
        return steps * batch_size / (time.perf_counter() - start)

    return rate


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench import viewpath

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    settings = simclr_settings()
    results: dict[str, Any] = {
        "machine": machine(),
        "batched_path_in_tree": viewpath.batched(),
        "settings": {
            "workers": args.workers,
            "repeats": args.repeats,
            "batches": args.batches,
            "batch_size": args.batch_size,
            "step_steps": args.step_steps,
            "torch_threads": 1,
            "recipe": "simclr",
            "augment": settings["augment"],
            "backbone": settings["backbone"],
        },
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="sslcook-bench-datapath-") as tmp:
        for name in args.workloads:
            wl = load_workload(name, args.tiny)
            start = time.perf_counter()
            shards = viewpath.make_shards(wl, Path(tmp) / name)
            print(f"{name}: shards in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            sides = build_sides(wl, shards, settings, args.batch_size)
            step = build_step(wl, settings, args.batch_size, args.step_steps)
            rates: dict[str, list[float]] = {f"{s}/w{w}": [] for w in args.workers for s in SIDES}
            rates["step"] = []
            jobs = [(s, w) for w in args.workers for s in SIDES] + [("step", None)]
            for r in range(args.repeats):
                k = r % len(jobs)
                for side, workers in jobs[k:] + jobs[:k]:  # rotated so no side always runs first
                    if side == "step":
                        rates["step"].append(step())
                    else:
                        rates[f"{side}/w{workers}"].append(sides[side](workers, args.batches))
                print(
                    f"{name} repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                    file=sys.stderr,
                    flush=True,
                )
            ratios: dict[str, list[float]] = {}
            for w in args.workers:
                b = rates[f"batched/w{w}"]
                ratios[f"batched/step w{w}"] = [x / y for x, y in zip(b, rates["step"])]
                ratios[f"batched/lightly w{w}"] = [x / y for x, y in zip(b, rates[f"lightly/w{w}"])]
                ratios[f"batched/persample w{w}"] = [x / y for x, y in zip(b, rates[f"persample/w{w}"])]
                ratios[f"persample/step w{w}"] = [x / y for x, y in zip(rates[f"persample/w{w}"], rates["step"])]
            results["workloads"][name] = {
                "workload": wl.describe(),
                "images_per_s": {k: median(v) for k, v in rates.items()},
                "runs": rates,
                "ratios": {k: median(v) for k, v in ratios.items()},
                "ratios_per_repeat": ratios,
            }
            write_results(_name(args), results, args.results_dir)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _name(args: argparse.Namespace) -> str:
    return "datapath-tiny" if args.tiny else "datapath"


def report(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results["workloads"].items():
        ips, q = r["images_per_s"], r["ratios"]
        for w in results["settings"]["workers"]:
            rows.append(
                [
                    name,
                    w,
                    ips[f"batched/w{w}"],
                    ips[f"persample/w{w}"],
                    ips[f"lightly/w{w}"],
                    ips["step"],
                    q[f"batched/step w{w}"],
                    q[f"batched/lightly w{w}"],
                    q[f"batched/persample w{w}"],
                ]
            )
    note = (
        ""
        if results["batched_path_in_tree"]
        else "\n(batched path not in this tree: the 'batched' column is the per-sample views run in the training "
        "process)"
    )
    return (
        table(
            [
                "workload",
                "workers",
                "batched img/s",
                "per-sample img/s",
                "lightly img/s",
                "SimCLR step img/s",
                "batched/step",
                "batched/lightly",
                "batched/per-sample",
            ],
            rows,
        )
        + note
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=8, help="timed batches per data-path run (after the first)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--step-steps", type=int, default=3, help="timed SimCLR steps per repeat (after one warm-up)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: 80-image workloads, batch 8, 1 repeat")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.repeats, args.batches, args.step_steps = 8, 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    publish(_name(args), run(args), args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
