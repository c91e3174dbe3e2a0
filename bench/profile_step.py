"""Where a training step spends its time: torch.profiler over steps of one side of one method.

    python -m bench.profile_step --method simclr [--side project|lightly|bare] [--batch-size 256] [--steps 2]

Prints the operators with the largest self CPU time (the table BENCHMARKS.md quotes where a target is missed).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", required=True)
    p.add_argument("--side", default="project", choices=("project", "lightly", "bare"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.steps import build_side, engine_cpu_mode, make_views
    from bench.workload import cifar10k

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    wl = cifar10k(train_per_class=2, test_per_class=1) if args.tiny else cifar10k()
    batch = 8 if args.tiny else args.batch_size
    images = wl.train_images[:batch]
    if len(images) < batch:
        images = images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch]
    views = make_views(args.method, images, channels=wl.channels, image_size=wl.image_size)
    side = build_side(args.side, args.method, batch_size=batch, total_steps=1000)
    if args.side == "project":
        engine_cpu_mode()  # the CPU settings Trainer.fit trains under
    side.step(views, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            side.step(views, i + 1)
    print(f"{args.method} / {args.side}, batch {batch}, {args.steps} steps, {torch.get_num_threads()} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
