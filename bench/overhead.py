"""Pipeline overhead: wall time of a no-op ``dvc repro`` and of a no-op ``sslcook run`` (the Prefect flow).

    python -m bench.overhead [--repeats 3] [--tiny]

Builds a workspace in a temporary directory the way the pipeline tests do (``tests/tiny_pipeline.py``: the
project's code and dvc.yaml, tiny params on a mnist5k subset, ``sslcook data ingest``, a full ``dvc repro``,
committed), then times, ``--repeats`` times each, commands that find everything up to date:
``dvc repro`` (DVC checks every stage's deps/outs hashes), ``sslcook run --no-prefect`` (the CLI around the same
repro) and ``sslcook run`` (the Prefect flow: DVC's plan, one task per stage, workspace lock, artifacts).
Every command is a fresh process, so interpreter and import start-up are part of the figure, as for a user.
Writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, table, write_results  # noqa: E402


def _env(ws: Path, home: Path) -> dict[str, str]:
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {
        **os.environ,
        "PATH": path,
        "DVC_NO_ANALYTICS": "1",
        "SSLCOOK_WORKSPACE": str(ws),
        "WANDB_MODE": "disabled",
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def timed(cmd: list[str], ws: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def build_workspace(parent: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.tiny_pipeline import make_workspace, repro_and_commit  # the pipeline tests' own tiny workspace

    ws = make_workspace(parent / "ws")
    repro_and_commit(ws, "bench: everything up to date")
    return ws


def run(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    commands = {
        "dvc repro (no-op)": [py, "-m", "dvc", "repro", "-q"],
        "sslcook run --no-prefect (no-op)": [py, "-m", "flows.cli", "run", "--no-prefect", "-q"],
        "sslcook run (Prefect flow, no-op)": [py, "-m", "flows.cli", "run", "-q"],
        "python -c 'import torch' (start-up reference)": [py, "-c", "import torch"],
    }
    tmp = Path(tempfile.mkdtemp(prefix="sslcook-bench-overhead-"))
    try:
        start = time.perf_counter()
        ws = build_workspace(tmp)
        build_s = time.perf_counter() - start
        env = _env(ws, tmp)
        times: dict[str, list[float]] = {name: [] for name in commands}
        timed(commands["sslcook run (Prefect flow, no-op)"], ws, env)  # first flow run sets up Prefect's database
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, ws, env))
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "machine": machine(),
        "repeats": args.repeats,
        "workspace_build_seconds": build_s,
        "seconds": {k: {"median": median(v), "all": v} for k, v in times.items()},
        "workspace_changed_by_noop_runs": [line for line in status.splitlines() if line.strip()],
        "target": "no-op dvc repro < 2 s",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="one repeat")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    results = run(args)
    path = write_results("overhead-tiny" if args.tiny else "overhead", results, args.results_dir)
    print(
        table(
            ["command (everything up to date)", "median s", "runs"],
            [[k, v["median"], ", ".join(f"{x:.2f}" for x in v["all"])] for k, v in results["seconds"].items()],
        )
    )
    print(f"\nworkspace built in {results['workspace_build_seconds']:.0f} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
