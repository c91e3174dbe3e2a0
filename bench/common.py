"""Small helpers shared by the benchmark scripts: machine description, results files, markdown tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _command() -> str:
    """How this script was started, as a user would type it (python -m bench.<script> args)."""
    if not sys.argv:
        return ""
    script = Path(sys.argv[0])
    head = f"python -m bench.{script.stem}" if script.parent.name == "bench" else f"python {script.name}"
    return " ".join([head, *sys.argv[1:]])


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": _command(),
    }
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        info["lightly"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def write_results(name: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def publish(
    name: str, results: dict[str, Any], results_dir: Path | None, report: Callable[[dict[str, Any]], str]
) -> Path:
    """Write a run's results file and print its report table with the load average before and after the run."""
    path = write_results(name, results, results_dir)
    print(report(results))
    print(
        f"\nload average {results['machine']['load_average']} -> {results['machine']['load_average_after']}; "
        f"written to {path}"
    )
    return path


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}"
    return str(v)
