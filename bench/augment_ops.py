"""Batched augmentation on the CPU: ssl_models.augment's vectorised torch against kornia.augmentation and the
per-image torchvision path it replaced, op by op and for the whole SimCLR recipe.

    python -m bench.augment_ops [--batch 256] [--repeats 3] [--threads 1 2] [--tiny] [--persample PATH]

Inputs: a batch of uint8 images, 28x28 grey (the default pipeline's digits; grey="skip": brightness and contrast
only) and 32x32 RGB (CIFAR-10). Ops: random resized crop (crop only), colour jitter (p=1; ours also with one fixed
order for all samples, to price torchvision's random order per sample), Gaussian blur (kernel 3, sigma per
sample), and the whole SimCLR recipe (2 views). Every side starts from the uint8 batch and ends with float
tensors. Sides and settings are interleaved (repeat -> threads -> input -> op -> side); the median of the
repeats is reported, as images/s. The per-image side is ``bench/persample.py`` (ssl_models/augment.py as it was
before views were made per batch), or the file given with ``--persample``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, publish

OPS = ("crop", "jitter", "jitter_fixed_order", "blur", "simclr")
INPUTS = {"grey28": (1, 28), "rgb32": (3, 32)}


def _persample_module(path: Path | None):
    if path is None:
        try:
            from bench import persample
        except ImportError:
            return None
        return persample
    spec = importlib.util.spec_from_file_location("persample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sides(channels: int, size: int, persample):
    """{op: {side: fn(uint8 batch) -> tensors}}."""
    import kornia.augmentation as K
    import torch
    from torchvision.transforms import v2

    from ssl_models.augment import _blur, _to_float, build_views

    colour = channels == 3
    b, c, s, h = (0.4, 0.4, 0.4 if colour else 0.0, 0.1 if colour else 0.0)
    g = torch.Generator().manual_seed(0)

    def per_image(transform):
        return lambda x: [transform(img) for img in x]

    def floats(x):
        return x.float().div_(255)

    crop = build_views("mim", image_size=size, channels=channels, flip_prob=0.0, crop_scale=(0.08, 1.0))
    jitter = build_views("simclr", image_size=size, channels=channels, jitter_prob=1.0)
    simclr = build_views("simclr", image_size=size, channels=channels)

    def ours_jitter(x, fixed=False):
        p = jitter.sample_params(x.shape[0], size, size, g)[0]
        if fixed:
            import dataclasses

            p = dataclasses.replace(p, order=torch.arange(4).expand(x.shape[0], 4))
        return jitter._jitter(_to_float(x, channels), p)

    def ours_blur(x):
        sigma = torch.rand(x.shape[0], generator=g) * 1.9 + 0.1
        return _blur(_to_float(x, channels), sigma, 3)

    k_jitter = K.ColorJitter(b, c, s, h, p=1.0)
    k_simclr = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(b, c, s, h, p=0.8),
        *([K.RandomGrayscale(p=0.2)] if colour else []),
        K.RandomGaussianBlur(3, (0.1, 2.0), p=0.5),
        K.Normalize(torch.tensor([0.449] * channels), torch.tensor([0.226] * channels)),
    )
    k_crop = K.RandomResizedCrop((size, size), scale=(0.08, 1.0))
    k_blur = K.RandomGaussianBlur(3, (0.1, 2.0), p=1.0)
    sides = {
        "crop": {"torch": lambda x: crop(x, g), "kornia": lambda x: k_crop(floats(x))},
        "jitter": {"torch": ours_jitter, "kornia": lambda x: k_jitter(floats(x))},
        "jitter_fixed_order": {"torch": lambda x: ours_jitter(x, fixed=True)},
        "blur": {"torch": ours_blur, "kornia": lambda x: k_blur(floats(x))},
        "simclr": {"torch": lambda x: simclr(x, g), "kornia": lambda x: [k_simclr(floats(x)) for _ in range(2)]},
    }
    if persample is not None:
        sides["crop"]["per-image"] = per_image(
            v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0)), v2.ToDtype(torch.float32, scale=True)])
        )
        sides["jitter"]["per-image"] = per_image(
            v2.Compose([v2.ColorJitter(b, c, s, h), v2.ToDtype(torch.float32, scale=True)])
        )
        sides["blur"]["per-image"] = per_image(
            v2.Compose([v2.GaussianBlur(3, (0.1, 2.0)), v2.ToDtype(torch.float32, scale=True)])
        )
        sides["simclr"]["per-image"] = per_image(persample.build_views("simclr", image_size=size, channels=channels))
    return sides


def run(batch: int, repeats: int, threads: list[int], persample) -> dict:
    import torch

    images = {
        name: torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for name, (c, s) in INPUTS.items()
    }
    sides = {name: _sides(c, s, persample) for name, (c, s) in INPUTS.items()}
    for name, ops in sides.items():  # warm up every side once (kernels, kornia's first-call setup)
        for fns in ops.values():
            for fn in fns.values():
                fn(images[name][:8])
    times: dict[str, list[float]] = {}
    previous = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for t in threads:
                torch.set_num_threads(t)
                for name, ops in sides.items():
                    for op, fns in ops.items():
                        for side, fn in fns.items():
                            start = time.perf_counter()
                            fn(images[name])
                            times.setdefault(f"{t}|{name}|{op}|{side}", []).append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    rows = []
    for key, values in times.items():
        t, name, op, side = key.split("|")
        rows.append(
            {
                "threads": int(t),
                "input": name,
                "op": op,
                "side": side,
                "images_per_s": batch / median(values),
                "seconds": values,
            }
        )
    return {"batch": batch, "repeats": repeats, "rows": rows}


def report(results: dict) -> str:
    by = {(r["threads"], r["input"], r["op"], r["side"]): r["images_per_s"] for r in results["rows"]}
    lines = [
        "| threads | input | op | torch (ours) | kornia | per-image torchvision | ours / kornia | ours / per-image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (t, name, op, side), ours in sorted(by.items()):
        if side != "torch":
            continue
        kornia, per = by.get((t, name, op, "kornia")), by.get((t, name, op, "per-image"))
        cells = [f"{v:,.0f}" if v else "-" for v in (kornia, per)]
        ratios = [f"**{ours / v:.2f}**" if v else "-" for v in (kornia, per)]
        lines.append(f"| {t} | {name} | {op} | {ours:,.0f} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.augment_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--persample", type=Path, default=None, help="the per-image module (default bench/persample.py)"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke run: batch 16, 1 repeat, 1 thread")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.repeats, args.threads = 16, 1, [1]
    info = machine()
    results = {"machine": info, **run(args.batch, args.repeats, args.threads, _persample_module(args.persample))}
    results["machine"]["load_average_after"] = machine()["load_average"]
    name = "augment_ops-tiny" if args.tiny else "augment_ops"
    publish(name, results, args.results_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
