"""Training-step throughput and peak memory: the project's step vs lightly's building blocks vs the bare backbone.

    python -m bench.throughput [--methods simclr byol ...] [--repeats 3] [--steps 3] [--batch-size 256]
                               [--stem standard|small] [--threads 2] [--tiny]

For every method: the views of one batch of cifar10k train images are made once by the project's augmentation
recipe and saved; then, ``--repeats`` times, one fresh process per side (so each side's peak RSS is its own)
builds that side (``bench.steps``), runs one warm-up step and times ``--steps`` steps on the same views. The
order of the project and lightly processes alternates between repeats (A/B, B/A, ...), and the figure reported is
the median over repeats of the per-repeat ratio project/lightly, which cancels most of the drift of a shared,
noisy machine. Images/s counts images (the batch), not views. ``bare`` is the backbone's forward + backward over
the same views (one process per method): the physical limit of a step; each side's median images/s over it is
reported too.

Writes bench/results/throughput.json (or --results-dir) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, publish, table, write_results  # noqa: E402
from bench.steps import METHODS  # noqa: E402

TINY = {"batch_size": 8, "steps": 1, "repeats": 1, "train_per_class": 2, "test_per_class": 1}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child(args: argparse.Namespace) -> int:
    """One side of one method in this process: warm-up step, timed steps; prints one JSON line."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from bench.steps import build_side, engine_cpu_mode

    rss_imports = _rss_mb()
    views = torch.load(args.views, weights_only=True)
    batch = int(views[0].shape[0])
    side = build_side(
        args.side,
        args.method,
        stem=args.stem,
        image_size=int(views[0].shape[-1]),
        channels=int(views[0].shape[1]),
        batch_size=batch,
        total_steps=1000,
        warmup_steps=0,
        device=args.device,
        precision=args.precision,
    )
    if args.side == "project" and torch.device(args.device).type == "cpu":
        engine_cpu_mode()  # the CPU settings Trainer.fit trains under
    side.step(views, 0)  # warm-up: allocations, lazy inits, optimizer state
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        side.step(views, i + 1)
        if torch.cuda.is_available() and torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = median(times)
    print(
        json.dumps(
            {
                "side": args.side,
                "method": args.method,
                "images_per_s": batch / step_s,
                "step_seconds": times,
                "peak_rss_mb": _rss_mb(),
                "rss_after_imports_mb": rss_imports,
                "parameters": side.parameters(),
                "batch_size": batch,
                "threads": torch.get_num_threads(),
            }
        )
    )
    return 0


def _run_child(side: str, method: str, views: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.throughput",
        "--child",
        "--side",
        side,
        "--method",
        method,
        "--views",
        str(views),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--stem",
        args.stem,
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{side}/{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_method_views(method: str, images, out_dir: Path) -> Path:
    import torch

    from bench.steps import make_views

    views = make_views(method, images, channels=int(images.shape[1]), image_size=int(images.shape[-1]))
    path = out_dir / f"views-{method}.pt"
    torch.save(views, path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.workload import cifar10k

    wl = cifar10k(args.archive, train_per_class=args.train_per_class, test_per_class=args.test_per_class)
    images = wl.train_images[: args.batch_size]
    results: dict[str, Any] = {
        "machine": machine(),
        "workload": wl.describe(),
        "settings": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "stem": args.stem,
            "device": args.device,
            "precision": args.precision,
            "backbone": f"torchvision ResNet-18 (width 64), {args.stem} stem; MAE: ViT-Tiny patch 4",
        },
        "methods": {},
    }
    with tempfile.TemporaryDirectory(prefix="sslcook-bench-views-") as tmp:
        for method in args.methods:
            views = make_method_views(method, images, Path(tmp))
            runs: dict[str, list[dict[str, Any]]] = {"project": [], "lightly": [], "bare": []}
            ratios = []
            for r in range(args.repeats):
                order = ["project", "lightly"] if r % 2 == 0 else ["lightly", "project"]
                # the bare backbone is the reference, not a contender: once per method is enough
                for side in order + (["bare"] if r == 0 else []):
                    runs[side].append(_run_child(side, method, views, args))
                ratios.append(runs["project"][-1]["images_per_s"] / runs["lightly"][-1]["images_per_s"])
                print(
                    f"{method} repeat {r + 1}/{args.repeats}: project/lightly {ratios[-1]:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
            ips = {s: median(x["images_per_s"] for x in v) for s, v in runs.items()}
            results["methods"][method] = {
                "images_per_s": ips,
                "ratio_project_over_lightly": median(ratios),
                "ratios": ratios,
                "ratio_to_bare": {s: ips[s] / ips["bare"] for s in ("project", "lightly")},
                "peak_rss_mb": {s: max(x["peak_rss_mb"] for x in v) for s, v in runs.items()},
                "rss_after_imports_mb": {s: min(x["rss_after_imports_mb"] for x in v) for s, v in runs.items()},
                "parameters": {s: v[0]["parameters"] for s, v in runs.items()},
                "views": [list(map(int, v)) for v in {tuple(x.shape) for x in _load(views)}],
                "runs": runs,
            }
            write_results(_name(args), results, args.results_dir)  # partial results survive an interruption
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _load(path: Path):
    import torch

    return torch.load(path, weights_only=True)


def _name(args: argparse.Namespace) -> str:
    return "throughput-tiny" if args.tiny else "throughput"


def report(results: dict[str, Any]) -> str:
    rows = []
    for method, r in results["methods"].items():
        ips, rss = r["images_per_s"], r["peak_rss_mb"]
        rows.append(
            [
                method,
                ips["project"],
                ips["lightly"],
                round(r["ratio_project_over_lightly"], 3),
                ", ".join(f"{x:.2f}" for x in r["ratios"]),
                ips["bare"],
                round(r["ratio_to_bare"]["project"], 3),
                round(r["ratio_to_bare"]["lightly"], 3),
                round(rss["project"]),
                round(rss["lightly"]),
            ]
        )
    return table(
        [
            "method",
            "project img/s",
            "lightly img/s",
            "project/lightly (median)",
            "per repeat",
            "bare backbone img/s",
            "project/bare",
            "lightly/bare",
            "project peak RSS MB",
            "lightly peak RSS MB",
        ],
        rows,
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--stem", choices=("standard", "small"), default="standard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--archive", type=Path, default=None)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="smoke mode: batch 8, 1 step, 1 repeat, tiny workload")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--child-timeout", type=int, default=900)
    # internal: one side in this process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--views", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    publish(_name(args), run(args), args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
