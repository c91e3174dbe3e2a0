"""Linear-probe time on features the size of the default pipeline's (mnist5k: 4,000 train / 1,000 test).

    python -m bench.probe [--threads 2] [--backends sklearn torch] [--tiny]

Feature sets: raw pixels (784-d, the raw-pixel baseline), a randomly initialised width-16 ResNet-18 (128-d, the
default CNN methods' width) and ViT-Tiny (192-d, MAE's), and 512 random ReLU features of the pixels (the width
of a torchvision ResNet-18). The probe is ``ssl_models.evaluation.linear_probe`` with the params.yaml defaults
(7-point C grid on a 10% validation split, then the refit on all of train), timed per backend, interleaved.
Its cost depends on n, d, the classes and how separable the features are, not on how they were trained.
Writes bench/results/probe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, publish, table  # noqa: E402


def feature_sets(tiny: bool):
    import torch

    from bench.workload import mnist5k
    from ssl_models.backbones import build_backbone
    from ssl_models.evaluation import extract_features, raw_pixel_features

    wl = mnist5k(train_per_class=40 if tiny else 400, test_per_class=10 if tiny else 100)
    sets = {"raw pixels (784)": (raw_pixel_features(wl.train_images), raw_pixel_features(wl.test_images))}
    torch.manual_seed(0)
    for name, config in (
        ("resnet18 w16 random init (128)", {"name": "resnet18", "small_image": True, "width": 16, "in_chans": 1}),
        (
            "vit_tiny random init (192)",
            {"name": "vit_tiny", "patch_size": 4, "depth": 6, "global_pool": "mean", "in_chans": 1, "image_size": 28},
        ),
    ):
        net = build_backbone(**config)
        sets[name] = tuple(
            extract_features(net, x, device="cpu", progress=False) for x in (wl.train_images, wl.test_images)
        )
    projection = torch.randn(784, 512, generator=torch.Generator().manual_seed(0)) / 28
    train, test = sets["raw pixels (784)"]
    sets["random ReLU features of pixels (512)"] = ((train @ projection).relu(), (test @ projection).relu())
    return wl, sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sklearn", "torch"], choices=["sklearn", "torch"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from ssl_models.evaluation import linear_probe
    from stages.workspace.config import load_params

    torch.set_num_threads(args.threads)
    info = machine()
    lp = load_params(ROOT / "params.yaml").evaluate.linear_probe
    wl, sets = feature_sets(args.tiny)
    import sklearn.linear_model  # noqa: F401  (imported once up front: its import time is not the probe's)

    rows = []
    for name, (train, test) in sets.items():
        for backend in args.backends:
            start = time.perf_counter()
            r = linear_probe(
                train,
                wl.train_labels,
                test,
                wl.test_labels,
                c_grid=lp.c_grid,
                max_iter=lp.max_iter,
                val_fraction=lp.val_fraction,
                backend=backend,
                seed=0,
                device="cpu",
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "features": name,
                    "dim": int(train.shape[1]),
                    "backend": backend,
                    "seconds": round(seconds, 2),
                    "top1": round(r["top1"], 4),
                    "c": r["c"],
                    "val_top1": round(r["val_top1"], 4),
                    "final_fit_iterations": r["iterations"],
                }
            )
            print(rows[-1], flush=True)
    info["load_average_after"] = [round(x, 2) for x in __import__("os").getloadavg()]
    results = {"machine": info, "threads": args.threads, "workload": wl.describe(), "c_grid": lp.c_grid, "rows": rows}

    def report(res):
        return table(
            ["features", "backend", "probe seconds", "test top-1", "chosen C", "final-fit iterations"],
            [
                [
                    r["features"],
                    r["backend"],
                    f"{r['seconds']:.2f}",
                    f"{r['top1']:.3f}",
                    f"{r['c']:g}",
                    str(r["final_fit_iterations"]),
                ]
                for r in res["rows"]
            ],
        )

    publish("probe-tiny" if args.tiny else "probe", results, args.results_dir, report)


if __name__ == "__main__":
    main()
