"""``sslcook trace PATH``: the chain behind an artifact, back to its raw data version and git commit.

PATH is a metrics file, an exported backbone (or its model folder / card), a checkpoint or a shard manifest.
The chain follows each record's ``parents`` (result -> backbone -> checkpoint -> shards), printing every step's
stage, params, commit and data version, and ends at the raw data version (the md5 of data/raw in data.dvc) and the
commit. An artifact is **stale** when what it was made from has changed on disk since: a parent whose sha256 is no
longer the recorded one, or a data version that is no longer the one in data.dvc. ``dvc status`` is asked too
(for the stages that made the chain), so the two verdicts can be read side by side.

A backbone copied out of the repository still traces: its safetensors header embeds the records of its ancestors.

The records are content only; each step's commit, dirty flag, time and flow run come from the run's provenance
file (``provenance/<stage>[/<method>].json``), used when it names the sha256 of that very artifact. Outside a
workspace (a copied backbone) the chain shows the content and says the run facts are kept in the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.workspace.common import DataError, is_workspace, workspace
from stages.workspace.lineage import DATA_DVC, data_version, read_provenance, sha256_file
from stages.workspace.provenance import Artifact, parent_order, read_artifact, resolve_artifact_path

# what a record's stage made, for records read from a child's embedded ancestors
STAGE_KIND = {
    "evaluate": "metrics",
    "export": "backbone",
    "pretrain": "checkpoint",
    "shard": "manifest",
    "report": "report",
}
RAW_DIR = "data/raw"


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit_exists(root: Path, commit: str | None) -> bool | None:
    if not commit:
        return None
    return _git(root, "cat-file", "-e", f"{commit}^{{commit}}") is not None


def committed_in(root: Path, rel: str, file: Path, limit: int = 200) -> str | None:
    """The newest commit whose version of ``rel`` has exactly the bytes of ``file`` (None if never committed)."""
    blob = _git(root, "hash-object", str(file))
    log = _git(root, "log", f"-n{limit}", "--format=%H", "--", rel)
    if not blob or not log:
        return None
    for commit in log.split():
        if _git(root, "rev-parse", f"{commit}:{rel}") == blob:
            return commit
    return None


def data_version_commit(root: Path, version: str | None, limit: int = 200) -> str | None:
    """The newest commit whose data.dvc records ``version``."""
    log = _git(root, "log", f"-n{limit}", "--format=%H", "--", DATA_DVC) if version else None
    for commit in (log or "").split():
        text = _git(root, "show", f"{commit}:{DATA_DVC}")
        try:
            if text and str(yaml.safe_load(text)["outs"][0]["md5"]) == version:
                return commit
        except (KeyError, IndexError, TypeError, yaml.YAMLError):
            continue
    return None


def lock_stages(root: Path) -> dict[str, list[str]]:
    """Stage name -> output paths, from dvc.lock (what DVC last ran)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return {
        name: [o["path"] for o in (st.get("outs") or []) if isinstance(o, dict) and "path" in o]
        for name, st in (doc.get("stages") or {}).items()
    }


def stage_of(rel: str, stages: dict[str, list[str]]) -> str | None:
    for name, outs in stages.items():
        for out in outs:
            if rel == out or rel.startswith(out.rstrip("/") + "/"):
                return name
    return None


def dvc_status(root: Path, targets: list[str]) -> dict[str, Any] | None:
    """``dvc status --json`` for the given stages (and data.dvc); None when DVC cannot answer."""
    if not targets:
        return {}
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json", *targets],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------------------------- the chain
def _rel(root: Path | None, path: Path) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root))
        except ValueError:
            pass
    return str(path)


RUN_FACTS = ("created_at", "git", "prefect_flow_run_id")


def run_facts(root: Path | None, record: dict[str, Any], sha256: str | None) -> dict[str, Any] | None:
    """The provenance of the artifact (commit, time, flow run, ...), or None where none describes this version.

    Records written before provenance files existed carried these facts themselves: they are used as they are.
    """
    if any(k in record for k in RUN_FACTS):
        return {k: record.get(k) for k in RUN_FACTS}
    if root is None:
        return None
    return read_provenance(root, record.get("stage"), record.get("method"), sha256)


def _parent(root: Path | None, name: str, entry: dict[str, Any], ancestors: dict[str, Any]) -> dict[str, Any]:
    """What is known of one parent: its record (the version on disk when it is the recorded one, else the copy
    the child embeds), kind, info, the file it was read from, and why it makes the child stale."""
    ppath, sha = entry["path"], entry.get("sha256")
    found: dict[str, Any] = {"record": None, "kind": name, "info": {}, "disk": None, "stale": []}
    parent_file = (root / ppath) if root is not None else None
    if parent_file is not None and parent_file.exists():
        resolved = resolve_artifact_path(parent_file)
        changed = bool(sha and resolved.is_file() and sha256_file(resolved) != sha)
        if changed:
            found["stale"].append(f"{name} {ppath} changed since (recorded sha256 {sha[:12]})")
        try:
            parent = read_artifact(resolved)
            found.update(kind=parent.kind, info=parent.info)
            if not changed or name not in ancestors:  # a changed one only when no embedded copy: marked changed
                found.update(record=parent.record, disk=resolved)
        except DataError:
            pass
    elif root is not None:
        found["stale"].append(f"{name} {ppath} is missing")
    if found["record"] is None and isinstance(ancestors.get(name), dict):
        embedded = ancestors[name]  # as it was when this artifact was made (from the header)
        found.update(record=embedded, disk=None, kind=STAGE_KIND.get(embedded.get("stage"), found["kind"]))
    return found


def build_chain(artifact: Artifact, root: Path | None) -> list[dict[str, Any]]:
    """The steps from ``artifact`` back through its parents (depth-first, main line first, each path once)."""
    steps: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(record: dict[str, Any], found: dict[str, Any], depth: int, via: str | None, sha256: str | None) -> bool:
        """Add a step for ``record`` (``found``: its kind, path, file on disk and info); True when it or anything
        upstream of it is stale."""
        on_disk = found["disk"]
        if on_disk is not None and on_disk.is_file():
            sha256 = sha256_file(on_disk)
        step = {
            "kind": found["kind"],
            "path": found["path"],
            "via": via,
            "depth": depth,
            "record": record,
            "info": found["info"],
            "stale": [],
            "source": "file" if on_disk is not None else "embedded",
            "provenance": run_facts(root, record, sha256),
        }
        steps.append(step)
        seen.add(found["path"])
        now = data_version(root) if root is not None and record.get("data_version") else None
        if now and now != record["data_version"]:
            step["stale"].append(f"made from data version {record['data_version']}, data.dvc now {now}")
        upstream_stale = False
        parents = record.get("parents") or {}
        for name in parent_order(parents):
            entry = parents[name] if isinstance(parents[name], dict) else {"path": str(parents[name])}
            if not entry.get("path") or entry["path"] in seen:
                continue
            parent = _parent(root, name, entry, record.get("ancestors") or {})
            step["stale"] += parent["stale"]
            leaf = {"path": entry["path"], "via": name, "depth": depth + 1, "record": {}, "stale": []}
            if parent["record"] is None and entry["path"].rstrip("/") == RAW_DIR:
                info = {"data_version": record.get("data_version")}
                steps.append({**leaf, "kind": "raw data", "info": info, "source": "dvc"})
            elif parent["record"] is None:
                steps.append({**leaf, "kind": parent["kind"], "info": parent["info"], "source": "missing"})
            elif visit(parent["record"], {**parent, "path": entry["path"]}, depth + 1, name, entry.get("sha256")):
                upstream_stale = True
        step["upstream_stale"] = upstream_stale
        return bool(step["stale"]) or upstream_stale

    path = _rel(root, artifact.path) if root else str(artifact.path)
    visit(
        artifact.record,
        {"kind": artifact.kind, "path": path, "disk": artifact.path, "info": artifact.info},
        0,
        None,
        None,
    )
    return steps


def trace(path: str | os.PathLike, *, use_dvc: bool = True) -> dict[str, Any]:
    """Everything ``sslcook trace`` prints, as a dict (``--json`` prints it as is)."""
    artifact = read_artifact(Path(path).expanduser())  # errors name the path as the user gave it
    artifact.path = artifact.path.resolve()
    root = workspace(near=artifact.path)
    root = root if is_workspace(root) else None
    inside = root is not None and str(artifact.path.resolve()).startswith(str(root) + os.sep)
    steps = build_chain(artifact, root)
    records = [s["record"] for s in steps if s["record"]]
    # the raw data version: from the deepest record that knows it (the shards), else any
    versions = [r.get("data_version") for r in reversed(records) if r.get("data_version")]
    raw_version = versions[0] if versions else (artifact.info.get("data_version"))
    facts = steps[0].get("provenance") or {}
    commit = (facts.get("git") or {}).get("commit")
    out: dict[str, Any] = {
        "artifact": str(artifact.path),
        "kind": artifact.kind,
        "workspace": str(root) if root else None,
        "inside_workspace": inside,
        "steps": steps,
        "data_version": raw_version,
        "data_version_now": data_version(root) if root else None,
        "commit": commit,
        "dirty": (facts.get("git") or {}).get("dirty"),
        "flow_run": facts.get("prefect_flow_run_id"),
        "made": facts.get("created_at"),
    }
    if root is not None:
        out["commit_exists"] = commit_exists(root, commit)
        out["data_version_commit"] = data_version_commit(root, raw_version)
        out["committed_in"] = committed_in(root, _rel(root, artifact.path), artifact.path) if inside else None
    out["stale"] = any(s["stale"] for s in steps)
    if use_dvc and root is not None:
        stages = lock_stages(root)
        names = []
        for s in steps:
            st = stage_of(s["path"], stages)
            s["dvc_stage"] = st
            if st and st not in names:
                names.append(st)
        targets = names + ([DATA_DVC] if (root / DATA_DVC).is_file() else [])
        status = dvc_status(root, targets)
        out["dvc_status"] = status
        out["dvc_stale"] = None if status is None else bool(status)
    return out


# ----------------------------------------------------------------------------------------------- printing
def _flatten(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict) and obj:
        return [item for k in sorted(obj) for item in _flatten(obj[k], f"{prefix}{k}.")]
    return [f"{prefix.rstrip('.')}={json.dumps(obj, default=str, separators=(',', ':'))}"]


def _params_lines(params: Any, indent: str, width: int = 118) -> list[str]:
    """Every param as key=value (nested keys dotted), wrapped: the full set, nothing elided."""
    import textwrap

    text = " ".join(_flatten(params))
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=f"{indent}params ",
        subsequent_indent=f"{indent}       ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _render_step(s: dict[str, Any], in_workspace: bool) -> list[str]:
    pad = "  " * s["depth"]
    rec = s["record"]
    head = f"{pad}{'<- ' + s['via'] + ': ' if s['via'] else ''}{s['kind']} {s['path']}"
    if s.get("dvc_stage"):
        head += f"  [dvc stage {s['dvc_stage']}]"
    head += {
        "embedded": "  (record embedded in the child)",
        "missing": "  (no record available)",
        "dvc": f"  (tracked by {DATA_DVC}: md5 {s['info'].get('data_version')})",
    }.get(s["source"], "")
    lines = [head]
    if rec:
        facts = s.get("provenance")
        if facts:
            git = facts.get("git") or {}
            run = (
                f"made {facts.get('created_at')}, commit {str(git.get('commit'))[:12]}"
                f"{' (dirty)' if git.get('dirty') else ''}, flow run {facts.get('prefect_flow_run_id') or '-'}"
            )
        else:
            run = (
                "no provenance file describes this version (commit, time unknown)"
                if in_workspace
                else "run facts (commit, time, flow run) not here: provenance/ of the workspace that made it"
            )
        lines.append(
            f"{pad}   stage {rec.get('stage')}, {run}, data version {rec.get('data_version')}, seed {rec.get('seed')}"
        )
        if rec.get("params"):
            lines.extend(_params_lines(rec["params"], f"{pad}   "))
    if "value" in s["info"]:
        lines.append(f"{pad}   {s['info'].get('primary_metric', 'value')} = {s['info']['value']}")
    return lines + [f"{pad}   STALE: {reason}" for reason in s["stale"]]


def _render_dvc_status(status: dict[str, Any] | None) -> list[str]:
    if status is None:
        return ["dvc status: could not be run"]
    if not status:
        return ["dvc status: up to date"]
    return [f"dvc status: {name}: {json.dumps(changes, sort_keys=True)}" for name, changes in status.items()]


def render(result: dict[str, Any]) -> str:
    lines = []
    if not result["workspace"]:
        lines.append(
            "  (not inside a pipeline workspace: chain read from the file's embedded records; staleness not checked)"
        )
    elif not result["inside_workspace"]:
        lines.append(f"  (outside the workspace; compared with {result['workspace']})")
    for s in result["steps"]:
        lines += _render_step(s, bool(result["workspace"]))
    lines.append(
        f"raw data version (data.dvc md5): {result['data_version']}"
        + (f"  [data.dvc now: {result['data_version_now']}]" if result.get("data_version_now") else "")
    )
    if result.get("data_version_commit"):
        lines.append(f"  committed in {result['data_version_commit']}")
    exists = result.get("commit_exists")
    if result.get("made") or result.get("flow_run"):
        lines.append(f"made {result.get('made')} by flow run {result.get('flow_run') or '- (a bare dvc repro)'}")
    lines.append(
        f"git commit: {result['commit']}{' (tree had uncommitted changes)' if result.get('dirty') else ''}"
        + ("" if exists is None else ("  [in this repository]" if exists else "  [NOT in this repository]"))
    )
    if result.get("committed_in"):
        lines.append(f"this file is committed in {result['committed_in']}")
    if result["workspace"]:
        restore = result.get("committed_in") or result.get("data_version_commit") or result["commit"]
        if restore:
            lines.append(f"restore its inputs: git checkout {restore} && dvc checkout")
        lines.append("verdict: " + ("STALE (inputs changed since it was made)" if result["stale"] else "up to date"))
    if "dvc_status" in result:
        lines += _render_dvc_status(result["dvc_status"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslcook trace", description=__doc__.splitlines()[0])
    parser.add_argument(
        "path",
        help="metrics/<m>.json, models/<m>[/backbone.safetensors], runs/<m>/checkpoint.pt, "
        "data/shards[/manifest.json], or a backbone file anywhere",
    )
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    parser.add_argument("--no-dvc", action="store_true", help="do not ask `dvc status` (faster)")
    args = parser.parse_args(argv)
    result = trace(args.path, use_dvc=not args.no_dvc)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    from flows.cli import main as cli_main

    sys.exit(cli_main(["trace", *sys.argv[1:]]))
