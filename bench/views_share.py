"""How much of a CPU pretraining step the batched views take, and what making them on a second thread buys.

    python -m bench.views_share [--methods simclr byol] [--batch-size 256] [--steps 4] [--repeats 3] [--tiny]

At ``--threads`` torch threads (params.yaml's default: 1) and one method's model as ``bench.e2e`` builds it
(torchvision ResNet-18, standard stem, cifar-sized 32 x 32 RGB uint8 batches), three loops per repeat, interleaved:
*serial* (views, then the step, as the engine runs them), *overlap* (batch k+1's views on a helper thread while
step k trains), and *views only*. The views' share of a serial step is serial / views-only images/s; overlap /
serial is the most a view thread (or the views moved into a loader worker) can gain end to end.
Writes bench/results/views_share.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, publish, table  # noqa: E402


def measure(method: str, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    import torch

    from bench import steps as S
    from bench import viewpath

    side, _ = S.project_side(
        method, backbone_cfg=None, image_size=32, channels=3, batch_size=batch_size, total_steps=10_000, stem="standard"
    )
    maker = viewpath.view_maker(S.method_class(method).augment, image_size=32, channels=3)
    S.engine_cpu_mode()
    images = torch.randint(
        0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )

    def views(i: int):
        return maker(images, viewpath.view_generator(0, 0, i))

    side.step(views(0), 0)  # warm-up: allocations, oneDNN primitives
    helper = ThreadPoolExecutor(1)

    def serial() -> float:
        start = time.perf_counter()
        for i in range(steps):
            side.step(views(i), i)
        return steps * batch_size / (time.perf_counter() - start)

    def overlap() -> float:
        start = time.perf_counter()
        pending = helper.submit(views, 0)
        for i in range(steps):
            made = pending.result()
            if i + 1 < steps:
                pending = helper.submit(views, i + 1)
            side.step(made, i)
        return steps * batch_size / (time.perf_counter() - start)

    def views_only() -> float:
        start = time.perf_counter()
        for i in range(steps):
            views(i)
        return steps * batch_size / (time.perf_counter() - start)

    runs: dict[str, list[float]] = {"serial": [], "overlap": [], "views_only": []}
    for r in range(repeats):
        order = [serial, overlap, views_only] if r % 2 == 0 else [views_only, overlap, serial]
        for fn in order:
            runs[fn.__name__].append(fn())
        print(
            f"{method} repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()),
            file=sys.stderr,
            flush=True,
        )
    helper.shutdown()
    out = {k: median(v) for k, v in runs.items()}
    return {
        "images_per_s": out,
        "runs": runs,
        "views_share_of_serial_step": out["serial"] / out["views_only"],
        "overlap_over_serial": median([o / s for o, s in zip(runs["overlap"], runs["serial"])]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("methods", "batch_size", "steps", "repeats", "threads")}
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "methods": {}}
    for method in args.methods:
        results["methods"][method] = measure(method, args.batch_size, args.steps, args.repeats)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def report(results: dict[str, Any]) -> str:
    rows = [
        [
            m,
            r["images_per_s"]["serial"],
            r["images_per_s"]["views_only"],
            r["views_share_of_serial_step"],
            r["overlap_over_serial"],
        ]
        for m, r in results["methods"].items()
    ]
    return table(["method", "serial img/s", "views only img/s", "views' share of a step", "overlap / serial"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="smoke mode: batch 8, 1 step, 1 repeat")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.steps, args.repeats = 8, 1, 1
    publish("views_share-tiny" if args.tiny else "views_share", run(args), args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
