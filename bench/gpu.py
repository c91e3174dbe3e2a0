"""The CUDA benchmark in one prepared run (about 7 minutes): the data path, the step throughput of every method,
then a time-boxed quality run.

    bench/gpu.sh            # on a machine with a CUDA GPU: bf16 autocast, batch 256, cifar10k
    bench/gpu.sh --tiny     # anywhere, on CPU, in about a minute: proves the script works
    bench/gpu.sh --parts datapath    # one part only (datapath, throughput, quality)

0. Data path (about 1.5 minutes): cifar10k sharded by the project's stages (PNG), then end-to-end pretraining
   (shards -> views -> the project's engine step, bf16) for ``--datapath-methods``, two ways: **batched** (the
   decode-only loader, ``--workers`` processes, pinned uint8 batches copied to the GPU, the recipe's ViewMaker on
   the GPU) and **per-sample** (``bench.persample`` views per image in ``--workers`` DataLoader workers, pinned,
   then copied). Per path: images/s, the share of the time spent waiting for the next batch (blocked in the
   loader; the step's ``float(loss)`` synchronises, so GPU work is not counted as waiting), the share making
   views in the training process, and ``torch.cuda.max_memory_allocated``. Two repeats, paths alternating.
1. Throughput (about 3 minutes): for each method, the project's step and lightly's (``bench.steps``) built in
   this process on the same pre-made views, timed in interleaved A/B rounds (project, lightly, lightly, project,
   ...) with ``torch.cuda.synchronize`` around each timed block; reports images/s, the median ratio
   project/lightly, the bare backbone's images/s and peak CUDA memory per side (``max_memory_allocated``).
2. Quality (``--quality-seconds`` per side, default 90): SimCLR on cifar10k (standard-stem ResNet-18), project
   vs lightly, each trained for the same wall-clock budget, views made per batch on the GPU
   (``bench.quality.batches``), then kNN top-1 (k=200).
   The number of epochs each side reached is recorded beside its accuracy (equal time, not equal epochs).

Writes bench/results/gpu.json (gpu-tiny.json in tiny mode) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, table, write_results
from bench.steps import METHODS

PARTS = ("datapath", "throughput", "quality")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(wl, args, device) -> dict[str, Any]:
    import torch

    from bench.steps import build_side, make_views

    images = wl.train_images[: args.batch_size]
    out: dict[str, Any] = {}
    for method in args.methods:
        views = [v.to(device) for v in make_views(method, images, channels=wl.channels, image_size=wl.image_size)]
        kw = dict(
            stem=args.stem,
            image_size=wl.image_size,
            channels=wl.channels,
            batch_size=args.batch_size,
            total_steps=1000,
            device=device,
            precision=args.precision,
        )
        rates: dict[str, list[float]] = {"project": [], "lightly": [], "bare": []}
        memory: dict[str, float] = {}
        sides = {}
        for name in rates:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sides[name] = build_side(name, method, **kw)
            sides[name].step(views, 0)  # warm-up (cuDNN autotuning, allocations)
            _sync(device)
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2**20
        step_index = 1
        for r in range(args.repeats):
            order = ["project", "lightly"] if r % 2 == 0 else ["lightly", "project"]
            for name in order + ["bare"]:
                _sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    sides[name].step(views, step_index)
                    step_index += 1
                _sync(device)
                rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
        ratios = [p / q for p, q in zip(rates["project"], rates["lightly"])]
        ips = {k: median(v) for k, v in rates.items()}
        out[method] = {
            "images_per_s": ips,
            "ratio_project_over_lightly": median(ratios),
            "ratios": ratios,
            "ratio_to_bare": {k: ips[k] / ips["bare"] for k in ("project", "lightly")},
            "peak_cuda_memory_mb": memory,
        }
        print(f"{method}: project/lightly {median(ratios):.3f}", file=sys.stderr, flush=True)
        del sides
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _run_path(path: str, repeat: int, *, side, maker, per_image, urls, args, device) -> dict[str, float]:
    """One timed pass of one data path (see ``datapath``)."""
    import torch

    from bench import viewpath

    cuda = device.type == "cuda"
    if path == "batched":
        loader = viewpath.decode_loader(
            urls, batch_size=args.batch_size, num_workers=args.workers, epoch=repeat, pin_memory=cuda
        )
    else:
        loader = viewpath.sample_loader(
            urls,
            per_image,
            pil=False,
            mode="RGB",
            batch_size=args.batch_size,
            num_workers=args.workers,
            seed=repeat,
            pin_memory=cuda,
        )
    it = iter(loader)
    wait = views_s = 0.0
    images = 0
    for i in range(args.datapath_steps + 1):
        if i == 1:  # step 0 is the untimed warm-up (worker start-up, cuDNN autotuning)
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            wait = views_s = 0.0
            images, begin = 0, time.perf_counter()
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        if path == "batched":
            views = maker(batch[0].to(device, non_blocking=True), viewpath.view_generator(0, repeat, i))
        else:
            views = [v.to(device, non_blocking=True) for v in batch[0]]
        t2 = time.perf_counter()
        side.step(views, i)
        if i >= 1:
            wait += t1 - t0
            views_s += t2 - t1
            images += len(batch[1])
    _sync(device)
    total = time.perf_counter() - begin
    del it
    return {
        "images_per_s": images / total,
        "data_wait_share": wait / total,
        "views_share": views_s / total,
        "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
    }


def datapath(wl, args, device) -> dict[str, Any]:
    """End-to-end images/s, data-wait share and peak memory: batched vs per-sample views (see the docstring)."""
    import tempfile

    import torch

    from bench import viewpath
    from bench.persample import build_views as persample_views
    from bench.steps import engine_cpu_mode, method_class, project_side

    cuda = device.type == "cuda"
    out: dict[str, Any] = {"batched_path_in_tree": viewpath.batched(), "workers": args.workers, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="sslcook-bench-gpu-") as tmp:
        start = time.perf_counter()
        urls = viewpath.train_urls(viewpath.make_shards(wl, Path(tmp)))
        out["shard_seconds"] = time.perf_counter() - start
        for method in args.datapath_methods:
            recipe = method_class(method).augment
            maker = viewpath.view_maker(recipe, image_size=wl.image_size, channels=wl.channels)
            per_image = persample_views(recipe, image_size=wl.image_size, channels=wl.channels)
            side, _ = project_side(
                method,
                image_size=wl.image_size,
                channels=wl.channels,
                batch_size=args.batch_size,
                total_steps=10_000,
                stem=args.stem,
                device=device,
                precision=args.precision,
            )
            if not cuda:
                engine_cpu_mode()

            runs: dict[str, list[dict[str, float]]] = {"batched": [], "persample": []}
            for r in range(args.datapath_repeats):
                for path in ["batched", "persample"] if r % 2 == 0 else ["persample", "batched"]:
                    runs[path].append(
                        _run_path(
                            path, r, side=side, maker=maker, per_image=per_image, urls=urls, args=args, device=device
                        )
                    )
            ratios = [b["images_per_s"] / p["images_per_s"] for b, p in zip(runs["batched"], runs["persample"])]
            out["methods"][method] = {
                **{path: {k: median(x[k] for x in v) for k in v[0]} for path, v in runs.items()},
                "ratio_batched_over_persample": median(ratios),
                "ratios": ratios,
                "runs": runs,
            }
            print(f"datapath {method}: batched/per-sample {median(ratios):.2f}", file=sys.stderr, flush=True)
            del side
            if cuda:
                torch.cuda.empty_cache()
    return out


def quality(wl, args, device) -> dict[str, Any]:
    import torch

    from bench.quality import batches
    from bench.steps import lightly_side, method_class, project_side
    from bench.viewpath import view_maker

    method = "simclr"
    steps_per_epoch = len(wl.train_images) // args.batch_size
    transform = view_maker(method_class(method).augment, image_size=wl.image_size, channels=wl.channels)
    # a generous step budget for the schedule; the time box ends the run
    total = max(steps_per_epoch, int(args.quality_seconds * 20))
    out: dict[str, Any] = {"method": method, "seconds_per_side": args.quality_seconds}
    for name in ("project", "lightly"):
        torch.manual_seed(args.seed)
        kw = dict(
            stem=args.stem,
            image_size=wl.image_size,
            channels=wl.channels,
            batch_size=args.batch_size,
            total_steps=total,
            warmup_steps=steps_per_epoch,
            device=device,
            precision=args.precision,
        )
        side = project_side(method, **kw)[0] if name == "project" else lightly_side(method, **kw)
        start, step, epoch = time.perf_counter(), 0, 0
        while time.perf_counter() - start < args.quality_seconds:
            for views, _ in batches(
                wl.train_images,
                wl.train_labels,
                transform,
                batch_size=args.batch_size,
                epoch=epoch,
                seed=args.seed,
                device=str(device),
            ):
                side.step([v.to(device, non_blocking=True) for v in views], step)
                step += 1
                if time.perf_counter() - start >= args.quality_seconds:
                    break
            epoch += 1
        _sync(device)
        seconds = time.perf_counter() - start
        from bench.quality import evaluate

        metrics = evaluate(side.backbone, wl, probe=False, device=str(device))
        out[name] = {**metrics, "steps": step, "epochs": step / steps_per_epoch, "train_seconds": seconds}
        print(f"quality {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny workload, batch 8: a one-minute smoke run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side per repeat")
    p.add_argument("--stem", choices=("standard", "small"), default="standard")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--quality-seconds", type=float, default=90.0)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--datapath-methods", nargs="+", default=["simclr", "byol", "dino", "mae"], choices=METHODS)
    p.add_argument("--datapath-steps", type=int, default=20, help="timed steps per path per repeat")
    p.add_argument("--datapath-repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: CPU cores - 2, at most 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from bench.workload import cifar10k

    warnings.filterwarnings("ignore")
    if args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        args.batch_size, args.repeats, args.steps, args.quality_seconds = 8, 2, 1, 3.0
        args.datapath_steps, args.datapath_repeats = 2, 1
        args.workers = 0 if args.workers is None else args.workers
        if args.methods == list(METHODS):
            args.methods = ["simclr", "mae"]
        if args.datapath_methods == ["simclr", "byol", "dino", "mae"]:
            args.datapath_methods = ["simclr"]
        wl = cifar10k(train_per_class=2, test_per_class=1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (bench/gpu.sh --tiny runs the CPU smoke mode)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        wl = cifar10k()
        if args.workers is None:
            args.workers = max(1, min(12, (os.cpu_count() or 4) - 2))
    results: dict[str, Any] = {
        "machine": machine(),
        "workload": wl.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
    }
    t0 = time.perf_counter()
    for part in args.parts:
        start = time.perf_counter()
        results[part] = {"datapath": datapath, "throughput": throughput, "quality": quality}[part](wl, args, device)
        results[f"{part}_seconds"] = time.perf_counter() - start
        write_results("gpu-tiny" if args.tiny else "gpu", results, args.results_dir)  # partial results survive
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = write_results("gpu-tiny" if args.tiny else "gpu", results, args.results_dir)
    if "datapath" in results:
        print(
            table(
                [
                    "method",
                    "batched img/s",
                    "per-sample img/s",
                    "batched/per-sample",
                    "data wait (batched)",
                    "data wait (per-sample)",
                    "views share (batched)",
                    "peak MB batched",
                    "peak MB per-sample",
                ],
                [
                    [
                        m,
                        r["batched"]["images_per_s"],
                        r["persample"]["images_per_s"],
                        r["ratio_batched_over_persample"],
                        r["batched"]["data_wait_share"],
                        r["persample"]["data_wait_share"],
                        r["batched"]["views_share"],
                        r["batched"]["peak_cuda_memory_mb"],
                        r["persample"]["peak_cuda_memory_mb"],
                    ]
                    for m, r in results["datapath"]["methods"].items()
                ],
            )
        )
    if "throughput" in results:
        print(
            table(
                [
                    "method",
                    "project img/s",
                    "lightly img/s",
                    "project/lightly",
                    "bare img/s",
                    "project/bare",
                    "lightly/bare",
                ],
                [
                    [
                        m,
                        r["images_per_s"]["project"],
                        r["images_per_s"]["lightly"],
                        r["ratio_project_over_lightly"],
                        r["images_per_s"]["bare"],
                        r["ratio_to_bare"]["project"],
                        r["ratio_to_bare"]["lightly"],
                    ]
                    for m, r in results["throughput"].items()
                ],
            )
        )
    if "quality" in results:
        q = results["quality"]
        print(
            f"\nquality ({q['method']}, {q['seconds_per_side']:.0f} s per side): project kNN "
            f"{q['project']['knn_top1']:.3f} ({q['project']['epochs']:.1f} epochs), lightly kNN "
            f"{q['lightly']['knn_top1']:.3f} ({q['lightly']['epochs']:.1f} epochs)"
        )
    print(f"total {time.perf_counter() - t0:.0f} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
