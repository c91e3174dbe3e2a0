"""The CUDA benchmark in one prepared run (about 8 minutes): throughput of every method, then a time-boxed quality run.

    bench/gpu.sh            # on a machine with a CUDA GPU: bf16 autocast, batch 256, cifar10k
    bench/gpu.sh --tiny     # anywhere, on CPU, in about a minute: proves the script works

1. Throughput (about 3 minutes): for each method, the project's step and lightly's (``bench.steps``) built in
   this process on the same pre-made views, timed in interleaved A/B rounds (project, lightly, lightly, project,
   ...) with ``torch.cuda.synchronize`` around each timed block; reports images/s, the median ratio
   project/lightly, the bare backbone's images/s and peak CUDA memory per side (``max_memory_allocated``).
2. Quality (``--quality-seconds`` per side, default 120): SimCLR on cifar10k (standard-stem ResNet-18), project
   vs lightly, each trained for the same wall-clock budget on pre-augmented epochs, then kNN top-1 (k=200).
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

from bench.common import machine, median, table, write_results  # noqa: E402
from bench.steps import METHODS  # noqa: E402


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(wl, args, device) -> dict[str, Any]:
    import torch

    from bench.steps import build_side, make_views

    images = wl.train_images[:args.batch_size]
    out: dict[str, Any] = {}
    for method in args.methods:
        views = [v.to(device) for v in make_views(method, images, channels=wl.channels, image_size=wl.image_size)]
        kw = dict(stem=args.stem, image_size=wl.image_size, channels=wl.channels, batch_size=args.batch_size,
                  total_steps=1000, device=device, precision=args.precision)
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
        out[method] = {"images_per_s": ips, "ratio_project_over_lightly": median(ratios), "ratios": ratios,
                       "ratio_to_bare": {k: ips[k] / ips["bare"] for k in ("project", "lightly")},
                       "peak_cuda_memory_mb": memory}
        print(f"{method}: project/lightly {median(ratios):.3f}", file=sys.stderr, flush=True)
        del sides
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def quality(wl, args, device) -> dict[str, Any]:
    import torch

    from bench.quality import batches
    from bench.steps import lightly_side, make_views, method_class, project_side
    from ssl_models.augment import build_views

    method = "simclr"
    steps_per_epoch = len(wl.train_images) // args.batch_size
    transform = build_views(method_class(method).augment, image_size=wl.image_size, channels=wl.channels)
    # a generous step budget for the schedule; the time box ends the run
    total = max(steps_per_epoch, int(args.quality_seconds * 20))
    out: dict[str, Any] = {"method": method, "seconds_per_side": args.quality_seconds}
    for name in ("project", "lightly"):
        torch.manual_seed(args.seed)
        kw = dict(stem=args.stem, image_size=wl.image_size, channels=wl.channels, batch_size=args.batch_size,
                  total_steps=total, warmup_steps=steps_per_epoch, device=device, precision=args.precision)
        side = project_side(method, **kw)[0] if name == "project" else lightly_side(method, **kw)
        start, step, epoch = time.perf_counter(), 0, 0
        while time.perf_counter() - start < args.quality_seconds:
            for views, _ in batches(wl.train_images, wl.train_labels, transform, batch_size=args.batch_size,
                                    epoch=epoch, seed=args.seed):
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
    del make_views
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
    p.add_argument("--quality-seconds", type=float, default=120.0)
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
        if args.methods == list(METHODS):
            args.methods = ["simclr", "mae"]
        wl = cifar10k(train_per_class=2, test_per_class=1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (bench/gpu.sh --tiny runs the CPU smoke mode)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        wl = cifar10k()
    results: dict[str, Any] = {"machine": machine(), "workload": wl.describe(),
                               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "device": str(device)}
    t0 = time.perf_counter()
    results["throughput"] = throughput(wl, args, device)
    results["throughput_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    results["quality"] = quality(wl, args, device)
    results["quality_seconds"] = time.perf_counter() - t1
    path = write_results("gpu-tiny" if args.tiny else "gpu", results, args.results_dir)
    print(table(["method", "project img/s", "lightly img/s", "project/lightly", "bare img/s", "project/bare",
                 "lightly/bare"],
                [[m, r["images_per_s"]["project"], r["images_per_s"]["lightly"], r["ratio_project_over_lightly"],
                  r["images_per_s"]["bare"], r["ratio_to_bare"]["project"], r["ratio_to_bare"]["lightly"]]
                 for m, r in results["throughput"].items()]))
    q = results["quality"]
    print(f"\nquality ({q['method']}, {q['seconds_per_side']:.0f} s per side): project kNN {q['project']['knn_top1']:.3f}"
          f" ({q['project']['epochs']:.1f} epochs), lightly kNN {q['lightly']['knn_top1']:.3f} "
          f"({q['lightly']['epochs']:.1f} epochs); total {time.perf_counter() - t0:.0f} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
