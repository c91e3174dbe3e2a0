"""Every benchmark of issue 7, one after the other (``make bench``).

    python -m bench.run_all [--tiny] [--skip throughput datapath e2e quality mnist5k data overhead] [--epochs E]

1. ``bench.throughput``: training-step images/s and peak RSS, project vs lightly vs the bare backbone (10 methods);
   ``bench.datapath``: the data path alone (decode + SimCLR views), batched vs per-sample vs lightly's transforms,
   beside the default SimCLR step; ``bench.e2e``: end-to-end pretraining images/s of every registered method,
   project vs lightly, each with its own data path;
2. ``bench.quality``: kNN top-1 at equal budget on cifar10k (SimCLR, BYOL, VICReg, MAE; default 20 epochs, about
   10 minutes a run on 2 CPU cores, 8 runs), then the same on mnist5k with the default pipeline's settings
   (backbones, per-method recipes, epochs), both sides;
3. ``bench.bench_data``: the data path (shard stage, loader vs ImageFolder);
4. ``bench.overhead``: no-op ``dvc repro`` and ``sslcook run``.

Results go to bench/results/*.json; BENCHMARKS.md explains them. The full set takes about 2.5 hours of exclusive
CPU; ``--tiny`` runs every script in its smoke mode in a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("throughput", "datapath", "e2e", "quality", "mnist5k", "data", "overhead")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--epochs", type=int, default=None, help="cifar10k quality epochs (default 20)")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    extra = (["--tiny"] if args.tiny else []) + (["--results-dir", str(args.results_dir)] if args.results_dir else [])

    from bench import datapath, e2e, overhead, quality, throughput

    status = 0
    for part in PARTS:
        if part in args.skip:
            continue
        print(f"\n## {part}\n", flush=True)
        start = time.perf_counter()
        if part == "throughput":
            rc = throughput.main(extra)
        elif part == "datapath":
            rc = datapath.main(extra)
        elif part == "e2e":
            rc = e2e.main(extra + (["--methods", "simclr", "mae", "rotnet"] if args.tiny else []))
        elif part == "quality":
            rc = quality.main(extra + (["--epochs", str(args.epochs)] if args.epochs else []))
        elif part == "mnist5k":
            rc = quality.main(
                [
                    "--workload",
                    "mnist5k",
                    *(
                        [
                            "--epochs",
                            "1",
                            "--methods",
                            "simclr",
                            "--results-dir",
                            str(args.results_dir or ROOT / "bench" / "results"),
                        ]
                        if args.tiny
                        else (["--results-dir", str(args.results_dir)] if args.results_dir else [])
                    ),
                ]
            )
        elif part == "data":
            from bench import bench_data

            rc = bench_data.main(["--loader-batches", "2"] if args.tiny else [])
        else:
            rc = overhead.main(extra)
        print(f"({part}: {time.perf_counter() - start:.0f} s, exit {rc})", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
