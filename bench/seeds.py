"""Seed scatter of the pipeline: every headline metric as mean +- sd over seeds, beside the committed single run.

    python -m bench.seeds --seeds 0 1 2                 # the default pipeline, 3 seeds (about 15 CPU minutes each)
    python -m bench.seeds --seeds 0 1 2 --jobs 3        # the seeds at once, each in its own clone
    python -m bench.seeds --seeds 0 1 --workspace WS    # another workspace (the tests use a tiny one)

A single run is one draw: ``seed`` moves the shard order, the initial weights, the views and the probe's split.
This runs the workspace's pipeline once per seed as a DVC experiment (``dvc exp run -S seed=S``) in a scratch
clone of the workspace's committed state (``git clone`` + the workspace's DVC cache for data/raw), so the
workspace, its params and its committed results are never touched. After each experiment it keeps
metrics/<method>.json (and the epoch-1 loss from runs/<method>/history.tsv), then writes

- ``bench/results/seeds[-TAG].json``: per seed, per method and baseline, every kNN top-1 and probe top-1, with
  mean, sd (n-1) and the committed single run's value, and the machine (CPU, torch kernel ISA, threads);
- ``bench/results/seeds[-TAG].md``: the same as a markdown table.

Float results also depend on the CPU's kernels (BENCHMARKS.md, "Seeds and machines"): run it with e.g.
``ATEN_CPU_CAPABILITY=avx2`` to see a second machine's draw on this one; the environment reaches every stage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# the CPU-dispatch knobs that change float results (recorded with the numbers)
ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
)


def sh(cmd: list[str], cwd: Path, timeout: float | None = None) -> str:
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    env.pop("SSLCOOK_WORKSPACE", None)  # the stages must write into the clone (their cwd), never the workspace
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"error: {' '.join(cmd)} failed in {cwd} ({proc.returncode}):\n" + "\n".join(tail))
    return proc.stdout


def dvc(args: list[str], cwd: Path, timeout: float | None = None) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd, timeout)


def scratch_clone(workspace: Path, scratch: Path, name: str = "ws") -> Path:
    """A clone of the workspace's HEAD sharing its DVC cache, with data/raw checked out."""
    clone = scratch / name
    sh(["git", "clone", "-q", str(workspace), str(clone)], scratch)
    for key, value in (("user.email", "bench@sslcook"), ("user.name", "sslcook bench")):
        sh(["git", "config", key, value], clone)  # dvc exp commits its experiments in the clone
    cache = dvc(["cache", "dir"], workspace).strip()
    dvc(["cache", "dir", "--local", cache], clone)
    dvc(["checkout", "-q", "data.dvc"], clone)
    return clone


def headline(doc: dict[str, Any]) -> dict[str, float]:
    """kNN top-1 at every k and the probe's top-1 (the numbers the README states)."""
    return {
        k: float(v)
        for k, v in doc.items()
        if (k.startswith("knn_top1_k") or k == "linear_probe_top1") and isinstance(v, (int, float))
    }


def rows_of(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """'method' and 'baseline (architecture)' rows -> headline values, from one run's metrics/*.json."""
    rows: dict[str, dict[str, float]] = {}
    for method, doc in sorted(metrics.items()):
        rows[method] = headline(doc)
        base = doc.get("baselines") or {}
        if "raw_pixels" in base:
            rows.setdefault("baseline: raw pixels", headline(base["raw_pixels"]))
        if "random_init" in base:
            rows.setdefault(f"baseline: random init ({doc.get('architecture')})", headline(base["random_init"]))
    return rows


def read_metrics(ws: Path, methods: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for m in methods:
        path = ws / "metrics" / f"{m}.json"
        if path.is_file():
            out[m] = json.loads(path.read_text())
    return out


def first_loss(ws: Path, method: str) -> float | None:
    path = ws / "runs" / method / "history.tsv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            return float(row["loss"]) if row.get("loss") else None
    return None


def summarise(per_seed: dict[int, dict[str, dict[str, float]]], single: dict[str, dict[str, float]]) -> dict:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in sorted({r for runs in per_seed.values() for r in runs}, key=lambda r: (r.startswith("baseline"), r)):
        keys = sorted({k for runs in per_seed.values() for k in runs.get(row, {})})
        for key in keys:
            values = [runs[row][key] for runs in per_seed.values() if key in runs.get(row, {})]
            table.setdefault(row, {})[key] = {
                "values": values,
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "single_run": (single.get(row) or {}).get(key),
            }
    return table


def markdown(table: dict, seeds: list[int], losses: dict[int, dict[str, float | None]], machine: dict) -> str:
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; {machine['cpu']}; knobs: "
        + (", ".join(f"{k}={v}" for k, v in machine["env"].items()) or "none set"),
        "",
        "| row | metric | committed single run | mean +- sd | per seed |",
        "|---|---|---|---|---|",
    ]
    for row, metrics in table.items():
        for key, s in metrics.items():
            sd = "" if s["sd"] is None else f" +- {s['sd']:.3f}"
            single = "–" if s["single_run"] is None else f"{s['single_run']:.3f}"
            lines.append(
                f"| {row} | {key} | {single} | {s['mean']:.3f}{sd} | {' / '.join(f'{v:.3f}' for v in s['values'])} |"
            )
    methods = sorted({m for per in losses.values() for m in per})
    if methods:
        lines += [
            "",
            "| epoch-1 loss | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for m in methods:
            cells = [losses[s].get(m) for s in seeds]
            lines.append(f"| {m} | " + " | ".join("–" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workspace", type=Path, default=ROOT, help="a pipeline workspace (git + dvc), committed")
    parser.add_argument("--scratch", type=Path, default=None, help="where the clone goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone (its experiments: dvc exp show)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own clone")
    parser.add_argument("--tag", default="", help="suffix of the result files (seeds-TAG.json)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 2:
        parser.error("--seeds: give at least 2 different seeds (3 or more for a useful sd)")
    workspace = args.workspace.resolve()
    if not (workspace / "dvc.yaml").is_file() or not (workspace / ".git").exists():
        parser.error(f"--workspace {workspace}: not a pipeline workspace (no dvc.yaml or no git)")

    import yaml

    from stages.workspace.lineage import cpu_name

    scratch = Path(tempfile.mkdtemp(prefix="sslcook-seeds-", dir=args.scratch))
    try:
        methods = list(yaml.safe_load((workspace / "params.yaml").read_text()).get("methods") or [])

        def run_seed(seed: int) -> tuple[dict[str, dict[str, float]], dict[str, float | None]]:
            # one clone per seed: experiments of several seeds can then run at once (--jobs)
            clone = scratch_clone(workspace, scratch, f"ws-seed{seed}")
            print(f"seeds: dvc exp run -S seed={seed} in {clone} ...", file=sys.stderr, flush=True)
            # --force: every seed is measured here, none restored from a cache made on another machine
            dvc(["exp", "run", "-q", "-f", "-n", f"seed-{seed}", "-S", f"seed={seed}"], clone)
            return rows_of(read_metrics(clone, methods)), {m: first_loss(clone, m) for m in methods}

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            done = dict(zip(args.seeds, pool.map(run_seed, args.seeds)))
        per_seed = {seed: done[seed][0] for seed in args.seeds}
        losses = {seed: done[seed][1] for seed in args.seeds}
        single = rows_of(read_metrics(workspace, methods))  # read last: the workspace may be re-run meanwhile
        machine = {
            "cpu": cpu_name(),
            "threads": os.cpu_count(),
            "env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        }
        table = summarise(per_seed, single)
        doc = {
            "seeds": args.seeds,
            "workspace": str(workspace),
            "methods": methods,
            "machine": machine,
            "rows": table,
            "epoch1_loss": {str(s): v for s, v in losses.items()},
            "command": "python -m bench.seeds " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        args.results_dir.mkdir(parents=True, exist_ok=True)
        name = "seeds" + (f"-{args.tag}" if args.tag else "")
        (args.results_dir / f"{name}.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (args.results_dir / f"{name}.md").write_text(markdown(table, args.seeds, losses, machine))
        print(f"seeds: {args.results_dir / name}.md", file=sys.stderr)
    finally:
        if args.keep:
            print(f"seeds: scratch clones kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
