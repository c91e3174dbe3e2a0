"""The Prefect flows on a tiny DVC pipeline of their own (seconds per run; the real stages have their own tests).

The toy pipeline has what the real one has: a params-driven first stage, foreach stages over a method list,
metrics files, a report directory; the tests add a stage that fails once, one that always fails, a slow one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, extract_cifar_subset, run

DVC = [sys.executable, "-m", "dvc"]


def py(code: str) -> str:
    """A stage command running inline Python (single quotes only inside)."""
    return f'python -c "{code}"'


def toy_stages(methods_key: str = "${methods}") -> dict:
    lineage = (
        f"import json,sys; sys.path.insert(0,'{PROJECT_ROOT}'); from stages.workspace.lineage import run_provenance; "
        "json.dump(run_provenance(), open('.lineage_seen.json','w'))"
    )
    return {
        "make": {
            "cmd": [
                py(
                    "import yaml,os; p=yaml.safe_load(open('params.yaml')); os.makedirs('data',exist_ok=True); "
                    "open('data/x.txt','w').write(str(p['seed']))"
                ),
                py(lineage),
            ],
            "params": ["seed"],
            "outs": ["data/x.txt"],
        },
        "train": {
            "foreach": methods_key,
            "do": {
                "cmd": py(
                    "import os; os.makedirs('runs',exist_ok=True); "
                    "open('runs/${item}.txt','w').write(open('data/x.txt').read()+'${item}')"
                ),
                "deps": ["data/x.txt"],
                "params": ["method.${item}"],
                "outs": ["runs/${item}.txt"],
            },
        },
        # finds its workspace as the real stages do (stages.workspace.common.workspace(): $SSLCOOK_WORKSPACE, else
        # the cwd)
        "evaluate": {
            "foreach": methods_key,
            "do": {
                "cmd": py(
                    "import json,os,yaml; w=os.environ.get('SSLCOOK_WORKSPACE','.'); "
                    "p=yaml.safe_load(open(w+'/params.yaml')); os.makedirs(w+'/metrics',exist_ok=True); "
                    "json.dump(dict(method='${item}',family='toy',primary_metric='score',"
                    "score=round(p['method']['${item}']['lr']*10,6)),open(w+'/metrics/${item}.json','w'))"
                ),
                "deps": ["runs/${item}.txt"],
                "params": ["method.${item}"],
                "metrics": [{"metrics/${item}.json": {"cache": False}}],
            },
        },
        "report": {
            "cmd": py(
                "import glob,json,os; os.makedirs('reports',exist_ok=True); "
                "rows=[json.load(open(f)) for f in sorted(glob.glob('metrics/*.json'))]; "
                "open('reports/summary.md','w').write('# toy report\\n\\n| method | family | score |\\n'"
                "'|---|---|---|\\n'"
                "+''.join('| %s | %s | %g |\\n' % (r['method'],r['family'],r['score']) for r in rows))"
            ),
            "deps": ["metrics"],
            "outs": ["reports"],
        },
    }


def make_toy(
    ws: Path,
    *,
    methods=("alpha", "beta"),
    extra_stages: dict | None = None,
    flow: dict | None = None,
    params: dict | None = None,
    commit: bool = True,
) -> Path:
    """A git + DVC workspace with the toy pipeline, committed."""
    ws.mkdir(parents=True, exist_ok=True)
    doc = {
        "seed": 3,
        "methods": list(methods),
        "method": {m: {"lr": round(0.1 * (i + 1), 6)} for i, m in enumerate(methods)},
        "flow": {"retries": 1, "retry_delay_seconds": 0, **(flow or {})},
    }
    doc.update(params or {})
    (ws / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {**toy_stages(), **(extra_stages or {})}}, sort_keys=False, width=1000)
    )
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "sslcook tests"],
        [*DVC, "init", "-q"],
        [*DVC, "config", "core.analytics", "false"],
    ):
        run(cmd, ws)
    if commit:
        run(["git", "add", "-A"], ws)
        run(["git", "commit", "-q", "-m", "toy pipeline"], ws)
    return ws


def flow_artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


TOY_ORDER = ["make", "train@alpha", "train@beta", "evaluate@alpha", "evaluate@beta", "report"]


def test_pipeline_flow_matches_dvc_repro_and_skips_everything_on_rerun(tmp_path):
    from flows.pipeline import pipeline_flow

    flow_ws = make_toy(tmp_path / "flow")
    repro_ws = make_toy(tmp_path / "repro")

    summary = pipeline_flow(workspace=str(flow_ws))
    assert [s["stage"] for s in summary["stages"]] == TOY_ORDER  # DVC's own order, foreach expanded
    assert {s["outcome"] for s in summary["stages"]} == {"ran"}
    run([*DVC, "repro"], repro_ws)
    lock = (flow_ws / "dvc.lock").read_text()
    assert lock == (repro_ws / "dvc.lock").read_text()

    # the flow run id reaches the stages, so every run's provenance names it
    assert json.loads((flow_ws / ".lineage_seen.json").read_text())["prefect_flow_run_id"] == summary["flow_run_id"]
    assert json.loads((repro_ws / ".lineage_seen.json").read_text())["prefect_flow_run_id"] is None

    head = run(["git", "rev-parse", "HEAD"], flow_ws).stdout.strip()
    assert summary["git_commit"] == head and summary["report"] == "reports/summary.md"
    # the results artifact publishes the report's own summary, as the report stage wrote it
    report_summary = (flow_ws / "reports/summary.md").read_text()
    assert "| alpha | toy | 1 |" in report_summary and "| beta | toy | 2 |" in report_summary
    markdown = summary["markdown"]
    assert markdown.endswith(report_summary)
    assert head in markdown and summary["flow_run_id"] in markdown
    artifacts = flow_artifacts(summary["flow_run_id"])
    assert {"sslcook-results", "sslcook-stages", "sslcook-report"} <= set(artifacts)
    assert artifacts["sslcook-results"].data == markdown
    assert f"]({(flow_ws / 'reports/summary.md').as_uri()})" in artifacts["sslcook-report"].data

    again = pipeline_flow(workspace=str(flow_ws))
    assert [(s["stage"], s["outcome"]) for s in again["stages"]] == [(name, "skipped") for name in TOY_ORDER]
    assert (flow_ws / "dvc.lock").read_text() == lock
    assert "up to date" in run([*DVC, "status"], flow_ws).stdout


# fails on its first attempt (leaving a marker outside its outputs), succeeds on the retry
FLAKY = {
    "cmd": py(
        "import os,sys; m='.flaky-tried'; first=not os.path.exists(m); open(m,'a').close(); "
        "print('flaky attempt, first' if first else 'flaky attempt, again'); "
        "sys.exit(1) if first else open('flaky.txt','w').write(open('data/x.txt').read())"
    ),
    "deps": ["data/x.txt"],
    "outs": ["flaky.txt"],
}


def test_retry_rescues_a_stage_that_fails_once_and_a_stage_that_keeps_failing_fails_the_flow(tmp_path):
    from flows.dvcops import StageFailed
    from flows.pipeline import pipeline_flow

    ws = make_toy(tmp_path / "ws", extra_stages={"flaky": FLAKY})
    run([*DVC, "remote", "add", "-d", "store", str(tmp_path / "store")], ws)  # so the run pulls and pushes
    summary = pipeline_flow(workspace=str(ws))
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["flaky"]["outcome"] == "ran" and by_stage["flaky"]["attempts"] == 2
    log = (ws / by_stage["flaky"]["log"]).read_text()
    assert "flaky attempt, first" in log and "flaky attempt, again" in log
    assert (ws / "flaky.txt").read_text() == "3"
    assert (ws / ".dvc/tmp/sslcook-logs/dvc-pull.log").exists()
    assert "in sync" in run([*DVC, "status", "--cloud"], ws).stdout  # pushed after the run

    # a stage that fails every time: the flow fails naming it and quoting its log; the workspace stays coherent
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    dvc_yaml["stages"]["broken"] = {
        "cmd": py("import sys; print('boom: the broken stage cannot work'); sys.exit(3)"),
        "deps": ["flaky.txt"],
        "outs": ["broken.txt"],
    }
    dvc_yaml["stages"]["after"] = {
        "cmd": py("open('after.txt','w').write(open('broken.txt').read())"),
        "deps": ["broken.txt"],
        "outs": ["after.txt"],
    }
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False, width=1000))
    lock_before = yaml.safe_load((ws / "dvc.lock").read_text())
    with pytest.raises(StageFailed) as failure:
        pipeline_flow(workspace=str(ws))
    message = str(failure.value)
    assert "stage 'broken' failed after 2 attempts" in message
    assert "boom: the broken stage cannot work" in message  # the tail of its log
    lock_after = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock_after == lock_before  # the good stages stay recorded, nothing else
    status = run([*DVC, "status"], ws).stdout
    assert "broken:" in status and "after:" in status and "flaky:" not in status
    assert not (ws / "after.txt").exists()


def test_no_prefect_runs_the_same_sequence_and_honours_no_pull_and_no_push(tmp_path, capsys):
    from flows.pipeline import main as run_main
    from flows.pipeline import run_plain

    ws = make_toy(tmp_path / "ws", extra_stages={"flaky": FLAKY})
    run([*DVC, "remote", "add", "-d", "store", str(tmp_path / "store")], ws)
    logs = ws / ".dvc/tmp/sslcook-logs"
    assert run_main(["--no-prefect", "-q", "--no-pull", "--no-push", "-w", str(ws)]) == 0
    table = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines()[: len(TOY_ORDER) + 1])
    assert table == {name: "ran" for name in TOY_ORDER + ["flaky"]}  # DVC's order, each stage on its own
    flaky_log = (logs / "flaky.log").read_text()
    assert "flaky attempt, first" in flaky_log and "flaky attempt, again" in flaky_log  # retried, as in the flow
    assert not (logs / "dvc-pull.log").exists() and not (logs / "dvc-push.log").exists()
    assert "in sync" not in run([*DVC, "status", "--cloud"], ws).stdout  # nothing pushed

    # what DVC did, from its status and dvc.lock: alpha's branch re-runs for a new lr, then comes back from DVC's
    # run cache when the lr is set back; the rest is skipped
    alpha_branch = {"train@alpha", "evaluate@alpha", "report"}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for lr, outcome in ((0.5, "ran"), (0.1, "restored")):
        params["method"]["alpha"]["lr"] = lr
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        summary = run_plain(str(ws), echo=False)  # params.yaml's flow.dvc_pull / flow.dvc_push: both
        assert [(s["stage"], s["outcome"], s["lock"]) for s in summary["stages"]] == [
            (name, outcome, "updated") if name in alpha_branch else (name, "skipped", "unchanged")
            for name in TOY_ORDER + ["flaky"]
        ]
        assert json.loads((ws / "metrics/alpha.json").read_text())["score"] == lr * 10
    assert (logs / "dvc-pull.log").exists() and "in sync" in run([*DVC, "status", "--cloud"], ws).stdout
    assert summary["flow_run_id"] is None and summary["markdown"].endswith((ws / "reports/summary.md").read_text())


def _lock_holder(ws: Path) -> str:
    return (
        (ws / ".dvc" / "tmp" / "sslcook-workspace.lock").read_text()
        if (ws / ".dvc" / "tmp" / "sslcook-workspace.lock").exists()
        else ""
    )


def test_two_runs_on_one_workspace_do_not_corrupt_it(tmp_path):
    from flows.dvcops import WorkspaceBusy
    from flows.pipeline import pipeline_flow

    release = tmp_path / "release"  # the slow stage holds the first run until the test has seen the lock work
    slow = {"cmd": f"python hold.py {release}", "deps": ["data/x.txt"], "outs": ["slow.txt"]}
    ws = make_toy(tmp_path / "ws", methods=("alpha",), extra_stages={"slow": slow}, commit=False)
    (ws / "hold.py").write_text(
        "import os, sys, time\nstart = time.time()\n"
        "while not os.path.exists(sys.argv[1]) and time.time() - start < 120:\n"
        "    time.sleep(0.2)\nopen('slow.txt', 'w').write('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--no-prefect", "-q", "-w", str(ws)]
    first = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _lock_holder(ws) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f'"pid": {first.pid}' in _lock_holder(ws)
        second = run(cmd, PROJECT_ROOT, check=False, env=env)
        assert second.returncode == 1
        assert "workspace busy" in second.stderr and f"pid {first.pid}" in second.stderr
        # the Prefect flow meets the same lock
        with pytest.raises(WorkspaceBusy, match=f"pid {first.pid}"):
            pipeline_flow(workspace=str(ws))
        release.touch()
        out, err = first.communicate(timeout=120)
    finally:
        release.touch()  # never leave the held stage waiting
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert _lock_holder(ws) == ""  # released
    assert "up to date" in run([*DVC, "status"], ws).stdout
    assert (ws / "slow.txt").read_text() == "done"


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process trees from /proc")
def test_sigterm_stops_the_run_with_its_stage_and_prefects_server(tmp_path):
    # `kill PID` (or a scheduler cancelling) of `sslcook run`: the stage dvc is running and Prefect's temporary
    # API server stop with it, the workspace lock is released, exit code 143
    hold = {"cmd": "python hold.py", "deps": ["data/x.txt"], "outs": ["slow.txt"]}
    ws = make_toy(tmp_path / "ws", methods=("alpha",), extra_stages={"slow": hold}, commit=False)
    (ws / "hold.py").write_text(
        "import os, time\nopen('stage.pid', 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\nopen('slow.txt', 'w').write('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "-q", "-w", str(ws), "--stage", "slow"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 180  # Prefect's temporary server starts first
        while not (ws / "stage.pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (ws / "stage.pid").exists(), proc.communicate(timeout=5) if proc.poll() is not None else "timeout"
        time.sleep(0.2)
        stage_pid = int((ws / "stage.pid").read_text())
        below = _descendants(proc.pid)
        assert stage_pid in below and len(below) >= 3  # dvc, the stage command, Prefect's server
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().endswith("terminated")
    time.sleep(1)
    assert [pid for pid in below if _running(pid)] == []
    assert not (ws / "slow.txt").exists()
    assert _lock_holder(ws) == ""


def test_sweep_runs_experiments_in_dvc_and_ranks_them(tmp_path, monkeypatch):
    from flows.sweep import sweep_flow

    ws = make_toy(tmp_path / "ws")
    # as `sslcook sweep` from elsewhere would be run; the experiments' stages must still use their own copy
    monkeypatch.setenv("SSLCOOK_WORKSPACE", str(ws))
    params_before = (ws / "params.yaml").read_text()
    summary = sweep_flow(
        workspace=str(ws),
        grid={"methods": [["alpha"]], "method.alpha.lr": [0.5, 0.7]},
        metric="score",
        max_parallel=2,
        name_prefix="toy",
    )
    assert [e["name"] for e in summary["experiments"]] == ["toy-1", "toy-2"]
    assert [e["state"] for e in summary["experiments"]] == ["success", "success"]
    assert summary["experiments"][0]["args"] == ["methods=[alpha]", "method.alpha.lr=0.5"]
    ranking = [(r["rank"], r["experiment"], r["method"], r["score"]) for r in summary["ranking"]]
    assert ranking == [(1, "toy-2", "alpha", 7.0), (2, "toy-1", "alpha", 5.0)]  # methods=[alpha]: no beta rows
    shown = run([*DVC, "exp", "show", "--json"], ws).stdout
    assert "toy-1" in shown and "toy-2" in shown
    # experiments ran in DVC's temporary copies: the workspace is as it was
    assert (ws / "params.yaml").read_text() == params_before
    assert run(["git", "status", "--porcelain"], ws).stdout == "" and not (ws / "metrics").exists()
    assert "| 1 | toy-2 | methods=[alpha] method.alpha.lr=0.7 | alpha | 7 |" in summary["markdown"]


def test_new_data_version_flow_and_a_fresh_clone_getting_its_data_back(tmp_path, cifar_archive):
    """New data: ingested, committed only when asked, pipeline run, versions before/after reported. A fresh
    clone (data.dvc, no data/raw): restored from the DVC cache, else ingested again from params' source."""
    from flows.data_flow import new_data_flow
    from flows.pipeline import ensure_raw_data
    from flows.pipeline import main as run_main
    from stages.workspace.lineage import data_version

    first = extract_cifar_subset(cifar_archive, tmp_path / "first", {"train": 2, "test": 1})
    second = extract_cifar_subset(cifar_archive, tmp_path / "second", {"train": 3, "test": 1})
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["data"].update({"source": "folder", "path": str(first)})
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "count": {
                        "cmd": py(
                            "import pathlib; open('count.txt','w')"
                            ".write(str(len(list(pathlib.Path('data/raw').rglob('*.*')))))"
                        ),
                        "deps": ["data/raw"],
                        "outs": ["count.txt"],
                    }
                }
            }
        )
    )
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "sslcook tests"],
        [*DVC, "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "workspace"],
    ):
        run(cmd, ws)

    made = new_data_flow(workspace=str(ws), commit=True)  # source and path from params.yaml
    v1 = made["data_version_after"]
    assert made["data_version_before"] is None and v1 == data_version(ws) and v1.endswith(".dir")
    assert made["commit"] == run(["git", "rev-parse", "HEAD"], ws).stdout.strip()
    assert run(["git", "show", "--name-only", "--format=", "HEAD"], ws).stdout.split() == [
        "data.dvc",
        "data/.gitignore",
    ]
    assert [(s["stage"], s["outcome"]) for s in made["pipeline"]["stages"]] == [
        ("data.dvc", "skipped"),
        ("count", "ran"),
    ]
    assert (ws / "count.txt").read_text() == str(10 * 3 + 1)  # 30 images + SOURCE.json
    assert f"data version after: `{v1}` (new)" in made["markdown"]

    newer = new_data_flow(source="folder", path=str(second), workspace=str(ws))  # not committed unless asked
    v2 = newer["data_version_after"]
    assert newer["data_version_before"] == v1 and v2 not in (v1, None) and newer["commit"] is None
    assert run(["git", "status", "--porcelain", "data.dvc"], ws).stdout.strip() == "M data.dvc"
    assert (ws / "count.txt").read_text() == str(10 * 4 + 1)

    # a fresh clone of the committed state: data.dvc records v1, data/raw is absent
    run(["git", "checkout", "-q", "--", "data.dvc"], ws)
    shutil.rmtree(ws / "data" / "raw")
    assert ensure_raw_data(ws) == f"restored data version {v1} from the DVC cache"
    assert ensure_raw_data(ws) is None  # nothing missing: nothing done
    shutil.rmtree(ws / "data" / "raw")
    shutil.rmtree(ws / ".dvc" / "cache")  # no cache, no remote: ingest params' source
    assert run_main(["--no-prefect", "-q", "-w", str(ws)]) == 0
    assert data_version(ws) == v1 and (ws / "count.txt").read_text() == str(10 * 3 + 1)
    assert run(["git", "status", "--porcelain", "data.dvc"], ws).stdout == ""  # byte-identical version


def test_stage_selection_and_user_errors(tmp_path):
    from flows.dvcops import plan_stages, resolve_root
    from flows.pipeline import main as run_main
    from flows.sweep import parse_grid_args, sweep_flow
    from stages.workspace.common import ConfigError
    from stages.workspace.config.flow import FlowConfig

    ws = make_toy(tmp_path / "ws")
    assert plan_stages(ws, ["evaluate@beta"]) == (["make", "train@beta", "evaluate@beta"], ["evaluate@beta"])
    assert plan_stages(ws, ["train"]) == (["make", "train@alpha", "train@beta"], ["train@alpha", "train@beta"])
    with pytest.raises(ConfigError, match="'nope' not found"):
        plan_stages(ws, ["nope"])
    with pytest.raises(ConfigError, match="dvc.yaml: file not found"):
        resolve_root(tmp_path)
    with pytest.raises(ConfigError, match="--grid 'lr=0.1'"):
        parse_grid_args(["lr=0.1"])
    assert parse_grid_args(["methods=[[simclr], [byol]]"]) == {"methods": [["simclr"], ["byol"]]}
    with pytest.raises(ConfigError, match="no such key"):
        sweep_flow(workspace=str(ws), grid={"method.gamma.lr": [1]})

    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["flow"]["retries"] = -1
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"params.yaml: flow.retries: Input should be greater than or equal to 0"):
        FlowConfig.from_workspace(ws)
    with pytest.raises(ConfigError, match="flow.retries"):
        run_main(["-w", str(ws), "--no-prefect"])


def test_every_function_in_flows_reads_in_one_screen():
    import ast

    long = []
    for path in sorted((PROJECT_ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
