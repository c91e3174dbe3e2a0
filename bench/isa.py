"""Which CPU kernel dispatch changes the float trajectory: a few SimCLR steps under each ISA setting.

    python -m bench.isa [--steps 4] [--results-dir bench/results]

Each setting runs in its own process (the dispatch is chosen when the libraries load) on the same seeded digits,
views, default backbone (width-16 small-stem ResNet-18) and SimCLR recipe, one thread. Reported per setting: the
loss of every step, a digest of the first step's views and of the final weights. Equal digests mean bit-identical
arithmetic; the first step whose loss differs shows where the kernels part. The settings are the three dispatchers
inside a PyTorch CPU wheel:

- ``ATEN_CPU_CAPABILITY`` (default | avx2 | avx512): ATen's vectorised kernels (elementwise ops, reductions,
  norms, the view transforms);
- ``ONEDNN_MAX_CPU_ISA`` (SSE41 | AVX2 | AVX512_CORE ...): oneDNN, which runs the float convolutions;
- ``MKL_ENABLE_INSTRUCTIONS`` / ``MKL_CBWR`` (AVX2 ...): MKL, which runs the matrix products (linear layers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: list[dict[str, str]] = [
    {},
    {},  # twice: the same machine and settings give the same bits
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ATEN_CPU_CAPABILITY": "avx512"},
    {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"MKL_CBWR": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    # what an AVX2-only x86 machine (e.g. AMD EPYC Zen 3) picks by itself
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_CBWR": "AVX2",
    },
]


def child(steps: int) -> dict:
    """The measured run (in the process whose environment holds the setting)."""
    import torch

    torch.set_num_threads(1)
    from bench.viewpath import view_generator, view_maker
    from ssl_models import registry
    from ssl_models.backbones import build_backbone
    from ssl_models.engine import seed_everything
    from ssl_models.optim import build_optimizer

    seed_everything(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views_of = view_maker(
        "simclr", image_size=28, channels=1, crop_scale=[0.4, 1.0], brightness=0.4, contrast=0.4, blur_prob=0.0
    )
    backbone = build_backbone(
        name="resnet18", small_image=True, width=16, in_chans=views_of.out_channels, image_size=28
    )
    cls = registry.get("simclr").cls
    method = cls(backbone, projector_hidden_dim=512, temperature=0.2)
    optimizer = build_optimizer(method, dict(cls.optimizer), len(images))
    losses, views_digest = [], None
    for step in range(steps):
        views = views_of(images, view_generator(0, 0, step, 0))
        if step == 0:
            views_digest = hashlib.sha256(views[0].numpy().tobytes()).hexdigest()[:12]
        out = method(views)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"]))
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in method.parameters())).hexdigest()[:12]
    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "losses": losses,
        "views": views_digest,
        "weights": weights,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isa", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return 0
    from stages.workspace.lineage import cpu_name

    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
    }
    clean.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + clean.get("PYTHONPATH", ""))
    runs = []
    for setting in SETTINGS:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.isa", "--child", "--steps", str(args.steps)],
            cwd=ROOT,
            env={**clean, **setting},
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append({"env": setting, **result})
        label = " ".join(f"{k}={v}" for k, v in setting.items()) or "(defaults)"
        print(
            f"{label:<95} {result['aten_capability']:<7} weights {result['weights']} views {result['views']} "
            f"losses {' '.join(f'{x:.6f}' for x in result['losses'])}",
            file=sys.stderr,
        )
    reference = runs[0]
    for r in runs:
        differs = [i + 1 for i, (a, b) in enumerate(zip(r["losses"], reference["losses"])) if a != b]
        r["first_step_that_differs"] = differs[0] if differs else None
        r["identical_to_defaults"] = r["weights"] == reference["weights"]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "cpu": cpu_name(),
        "steps": args.steps,
        "runs": runs,
        "command": "python -m bench.isa " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (args.results_dir / "isa.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
