"""Data-path benchmark: shard stage throughput, and the WebDataset loader against ImageFolder + DataLoader.

    python -m bench.bench_data [--archive ../shared/data/cifar10-images.tar.gz] [--loader-batches 40]

In one run, in a temporary workspace:
1. ``sslcook data ingest`` of the full CIFAR-10 archive (60,000 JPEGs) and the shard stage over it
   (RGB, jpg shards: original bytes kept), then the same for mnist5k (grey PNG);
2. loader images/s with two SimCLR views at num_workers 0 and 2, and decode only: ssl_models.data.make_loader
   over the shards (views per batch in this process, as the engine makes them: ``bench.viewpath``) vs
   torchvision ImageFolder + DataLoader over data/raw/train (the same images, the per-sample baseline's views
   ``bench.persample`` in its workers, batch 256, shuffled), alternating, best of 2;
3. the training step's images/s for the default CPU backbone (params.yaml pretrain.backbone) with SimCLR on
   28x28 grey digits, to check the loader keeps ahead of training by the 3x the issue asks for.
Prints a markdown table and writes bench/results/data.json. Timings on a shared 2-core machine are noisy: the
load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)

import torch
import yaml

RESULTS = ROOT / "bench" / "results" / "data.json"
BATCH = 256


def workspace(path: Path, **overrides: Any) -> Path:
    path.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def prepare(ws: Path, source: str, path: Path | None) -> dict[str, Any]:
    from stages.shard import shard
    from stages.workspace.ingest import ingest

    result, ingest_s = timed(lambda: ingest(source, path, run_dvc=False, root=ws))
    manifest, shard_s = timed(lambda: shard(ws))
    return {
        "images": result.total,
        "ingest_s": round(ingest_s, 2),
        "ingest_images_per_s": round(result.total / ingest_s),
        "shard_s": round(shard_s, 2),
        "shard_images_per_s": round(result.total / shard_s),
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
        "shard_workers": os.cpu_count(),
        "image_format": manifest["image_format"],
    }


def loader_rate(batches: Any, limit: int) -> dict[str, Any]:
    """Images/s from the start of iteration (worker start-up included) to the ``limit``-th batch."""
    start = time.perf_counter()
    images = 0
    n = 0
    for _views, labels in batches:
        images += len(labels)
        n += 1
        if n == limit:
            break
    seconds = time.perf_counter() - start
    return {"images_per_s": round(images / seconds, 1), "images": images, "batches": n, "seconds": round(seconds, 2)}


def bench_loaders(
    ws: Path, views: Callable, mode: str, limit: int, repeats: int = 2, maker: Callable | None = None
) -> list[dict[str, Any]]:
    """Both loaders at num_workers 0 and 2, alternating, best of ``repeats`` (other jobs share the machine);
    plus decode-only runs (no views) that show each loader's own cost."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.v2.functional import pil_to_tensor

    from ssl_models.data import shard_urls

    urls = shard_urls(ws / "data" / "shards", "train")

    from bench.viewpath import Viewed, decode_loader

    def ours(workers: int, transform: Callable | None):
        loader = decode_loader(urls, batch_size=BATCH, num_workers=workers, seed=0)
        return loader if transform is None else Viewed(loader, maker)

    def theirs(workers: int, transform: Callable | None):
        folder = ImageFolder(
            str(ws / "data" / "raw" / "train"),
            loader=lambda p: _open(p, mode),
            transform=lambda img: (transform or (lambda t: [t]))(pil_to_tensor(img)),
        )
        return torch.utils.data.DataLoader(
            folder,
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),
        )

    rows = []
    for workers, transform, label in [
        (0, None, "decode only"),
        (0, views, "2 SimCLR views"),
        (2, views, "2 SimCLR views"),
    ]:
        best: dict[str, dict[str, Any]] = {}
        for _ in range(repeats):
            for name, build in (("sslcook WebDataset", ours), ("torchvision ImageFolder + DataLoader", theirs)):
                loader = build(workers, transform)
                rate = loader_rate(loader, min(limit, len(loader)))
                if name not in best or rate["images_per_s"] > best[name]["images_per_s"]:
                    best[name] = rate
        for name, rate in best.items():
            rows.append({"loader": name, "views": label, "num_workers": workers, **rate})
            print(f"  {ws.name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _open(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert(mode)


def train_step_rate(steps: int = 6) -> dict[str, Any]:
    """SimCLR training steps (forward, backward, optimiser) of the default CPU backbone on 28x28 grey views."""
    from ssl_models import registry
    from ssl_models.backbones import build_backbone

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    backbone_cfg = dict(params["pretrain"]["backbone"])
    name = backbone_cfg.pop("name")
    hparams = {
        k: v for k, v in params.get("method", {}).get("simclr", {}).items() if k in registry.get("simclr").defaults()
    }
    method = registry.get("simclr").cls(build_backbone(name, in_chans=1, **backbone_cfg), **hparams)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    views = [torch.randn(BATCH, 1, 28, 28), torch.randn(BATCH, 1, 28, 28)]

    def step():
        opt.zero_grad(set_to_none=True)
        method(views)["loss"].backward()
        opt.step()

    step()  # warm-up
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    return {
        "images_per_s": round(BATCH * steps / seconds, 1),
        "backbone": {"name": name, **backbone_cfg},
        "method": "simclr",
        "batch_size": BATCH,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-images.tar.gz")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches of 256 timed per loader run")
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        print(f"error: {args.archive}: CIFAR-10 archive not found (--archive)", file=sys.stderr)
        return 2

    from bench.persample import build_views
    from bench.viewpath import view_maker

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="sslcook-bench-data-"))
    try:
        cifar_ws = workspace(tmp / "cifar10", **{"data.image_mode": "RGB", "shard.image_format": "jpg"})
        mnist_ws = workspace(tmp / "mnist5k")
        prep = {"cifar10": prepare(cifar_ws, "cifar10", args.archive), "mnist5k": prepare(mnist_ws, "mnist5k", None)}
        loaders = {
            "cifar10": bench_loaders(
                cifar_ws,
                build_views("simclr", image_size=32, channels=3),
                "RGB",
                args.loader_batches,
                maker=view_maker("simclr", image_size=32, channels=3),
            ),
            "mnist5k": bench_loaders(
                mnist_ws,
                build_views("simclr", image_size=28, channels=1),
                "L",
                args.loader_batches,
                maker=view_maker("simclr", image_size=28, channels=1),
            ),
        }
        train = train_step_rate()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mnist_wds = {
        r["num_workers"]: r["images_per_s"]
        for r in loaders["mnist5k"]
        if r["loader"].startswith("sslcook") and r["views"] != "decode only"
    }
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "prepare": prep,
        "loaders": loaders,
        "train_step": train,
        "loader_over_train_step": {
            f"num_workers={w}": round(v / train["images_per_s"], 2) for w, v in mnist_wds.items()
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print("| dataset | step | images | seconds | images/s |")
    print("|---|---|---|---|---|")
    for name, p in prep.items():
        print(f"| {name} | ingest | {p['images']} | {p['ingest_s']} | {p['ingest_images_per_s']} |")
        print(
            f"| {name} | shard stage ({p['image_format']}, {p['shard_workers']} processes) | {p['images']} | "
            f"{p['shard_s']} | {p['shard_images_per_s']} |"
        )
    print()
    print(f"| dataset | loader (batch {BATCH}, best of 2) | per-sample work | num_workers | images | images/s |")
    print("|---|---|---|---|---|---|")
    for name, rows in loaders.items():
        for r in rows:
            print(
                f"| {name} | {r['loader']} | {r['views']} | {r['num_workers']} | {r['images']} | {r['images_per_s']} |"
            )
    print()
    print(
        f"training step (SimCLR, {train['backbone']}, batch {BATCH}, 28x28 grey, {train['torch_threads']} threads):"
        f" {train['images_per_s']} images/s; loader / training: {results['loader_over_train_step']}"
    )
    print(
        f"load average before {results['machine']['load_average_before']}, after "
        f"{results['machine']['load_average_after']}; written to {RESULTS.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
