"""Deployments: prefect.yaml agrees with params.yaml, and on a real Prefect server (started here, on 127.0.0.1,
with its own PREFECT_HOME) the nightly deployments are created with cron schedules that list upcoming runs, and a
run triggered on the pipeline deployment completes through a process worker."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, run
from test_flows import make_toy

PREFECT = [sys.executable, "-m", "prefect"]


def _params_flow() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["flow"]


def test_prefect_yaml_matches_params_and_sslcook_serve(capsys):
    from flows.deploy import DEPLOYMENT_NAME, WORK_POOL, deployment_specs
    from flows.deploy import main as serve_main
    from stages.workspace.config.flow import FlowConfig

    config = FlowConfig.from_workspace(PROJECT_ROOT)
    specs = {spec["entrypoint"]: spec for spec in deployment_specs(config)}
    project = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    deployments = [d for d in project["deployments"] if d["name"] == DEPLOYMENT_NAME]  # the GPU ones: below
    assert sorted(d["entrypoint"] for d in deployments) == sorted(specs)
    for dep in deployments:
        spec = specs[dep["entrypoint"]]
        module_path, func = dep["entrypoint"].split(":")
        flow_obj = getattr(importlib.import_module(module_path[:-3].replace("/", ".")), func)
        assert flow_obj.name == spec["flow"]  # the entrypoint is the flow serve deploys
        assert dep["name"] == DEPLOYMENT_NAME and dep["work_pool"]["name"] == WORK_POOL
        assert dep["schedules"] == [{"cron": spec["cron"], "timezone": config.timezone}]
        assert dep["parameters"] == spec["parameters"] == {"wait_minutes": _params_flow()["wait_minutes"]}
        assert dep["concurrency_limit"] == 1
    assert {s["cron"] for s in specs.values()} == set(_params_flow()["schedule"].values())

    assert serve_main(["--dry-run", "-w", str(PROJECT_ROOT)]) == 0
    out = capsys.readouterr().out
    for spec in specs.values():
        assert f"{spec['flow']}/nightly: cron '{spec['cron']}' (UTC)" in out


def test_schedule_crons_are_checked_as_prefect_parses_them(tmp_path):
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from stages.workspace.common import ConfigError
    from stages.workspace.config.flow import FlowConfig

    verdicts = set()
    for value in (
        "0 2 * * *",
        "*/15 3 * * mon-fri",
        "0 0 L * *",
        "@daily",
        "61 2 * * *",
        "0 2 * *",
        "0 25 * * *",
        "H 2 * * *",
        "nightly",
    ):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"flow": {"schedule": {"sweep": value}}}))
        try:
            CronSchedule(cron=value)
            prefect_accepts = True
        except ValidationError:
            prefect_accepts = False
        try:
            FlowConfig.from_workspace(tmp_path)
            accepted, message = True, ""
        except ConfigError as exc:
            accepted, message = False, str(exc)
        assert accepted == prefect_accepts, value
        if not accepted:  # one line naming the key and the value
            assert message.startswith("params.yaml: flow.schedule.sweep: ") and repr(value) in message
            assert "\n" not in message
        verdicts.add(accepted)
    assert verdicts == {True, False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; stopped by its PID (process group)."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"prefect server exited with {proc.returncode}:\n{(home / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120s:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        with_group = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            with_group = False
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if with_group:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_nightly_deployments_schedule_runs_and_a_worker_completes_one(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import DEPLOYMENT_NAME, WORK_POOL

    url, env = prefect_server
    crons = _params_flow()["schedule"]
    # what the README tells a user to do, from the repository root
    run([*PREFECT, "work-pool", "create", WORK_POOL, "--type", "process"], PROJECT_ROOT, env=env, timeout=120)
    deployed = run([*PREFECT, "--no-prompt", "deploy", "--name", DEPLOYMENT_NAME], PROJECT_ROOT, env=env, timeout=180)
    for flow_name in ("sslcook-new-data", "sslcook-pipeline", "sslcook-sweep"):
        assert (
            f"'{flow_name}/nightly' successfully created" in deployed.stdout.replace("\n", " ").replace("│", "")
            or f"{flow_name}/nightly" in deployed.stdout
        )

    toy = make_toy(tmp_path / "toy", methods=("alpha",))
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployments = {
            name: client.read_deployment_by_name(f"{name}/nightly")
            for name in ("sslcook-new-data", "sslcook-pipeline", "sslcook-sweep")
        }
        for name, key in (
            ("sslcook-new-data", "new_data"),
            ("sslcook-pipeline", "pipeline"),
            ("sslcook-sweep", "sweep"),
        ):
            (schedule,) = deployments[name].schedules
            assert schedule.active and schedule.schedule.cron == crons[key] and schedule.schedule.timezone == "UTC"
            assert deployments[name].work_pool_name == WORK_POOL
        pipeline = deployments["sslcook-pipeline"]
        assert (
            Path(pipeline.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]) == PROJECT_ROOT
        )

        # the server's scheduler fills in the upcoming nightly runs
        scheduled_only = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        )
        deadline = time.monotonic() + 60
        upcoming = []
        while not upcoming and time.monotonic() < deadline:
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[pipeline.id])),
                flow_run_filter=scheduled_only,
            )
            time.sleep(1)
        assert upcoming, "no scheduled runs within 60s"
        now = dt.datetime.now(dt.timezone.utc)
        minute, hour = (int(x) for x in crons["pipeline"].split()[:2])
        starts = sorted(r.expected_start_time for r in upcoming)
        assert starts[0] > now and all((s.hour, s.minute) == (hour, minute) for s in starts)
        assert all(b - a == dt.timedelta(days=1) for a, b in zip(starts, starts[1:]))  # nightly

        # a run triggered now, on a queue of its own (so the worker never picks up a nightly run)
        client.create_work_queue(name="sslcook-test", work_pool_name=WORK_POOL)
        triggered = client.create_flow_run_from_deployment(
            pipeline.id, parameters={"workspace": str(toy)}, work_queue_name="sslcook-test"
        )
    worker = run(
        [
            *PREFECT,
            "worker",
            "start",
            "--pool",
            WORK_POOL,
            "--work-queue",
            "sslcook-test",
            "--run-once",
            "--limit",
            "1",
        ],
        PROJECT_ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        state = client.read_flow_run(triggered.id).state
        assert state is not None and state.type == StateType.COMPLETED, (
            f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[triggered.id]))
        )
    results = {a.key: a for a in artifacts}["sslcook-results"]
    assert str(triggered.id) in results.data and "| alpha | toy |" in results.data
    assert (toy / "dvc.lock").exists() and "up to date" in run([sys.executable, "-m", "dvc", "status"], toy).stdout
    import json

    assert json.loads((toy / ".lineage_seen.json").read_text())["prefect_flow_run_id"] == str(triggered.id)


# ------------------------------------------------------------------------------------ GPU work pools
GPU_POOL, DOCKER_POOL = "sslcook-gpu", "sslcook-docker"
K8S_TEMPLATE = PROJECT_ROOT / "flows" / "templates" / "kubernetes-gpu-job-template.json"


def _deployment(name: str) -> dict:
    project = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in project["deployments"] if d["name"] == name]
    return dep


def test_docker_and_kubernetes_gpu_templates_validate_against_the_workers_schemas():
    import asyncio

    import docker.types
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError, validate
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # Docker: the deployment's job variables against the Docker worker's base job template
    variables = _deployment("gpu-docker")["work_pool"]["job_variables"]
    template = DockerWorker.get_default_base_job_template()
    validate(variables, template["variables"], raise_on_error=True)
    with pytest.raises(ValidationError):
        validate({**variables, "container_create_kwargs": "all"}, template["variables"], raise_on_error=True)
    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, variables))
    assert config.image == "sslcook:latest"
    kwargs = config.container_create_kwargs
    host = docker.types.HostConfig(
        version="1.44", device_requests=kwargs["device_requests"], shm_size=kwargs["shm_size"]
    )
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]  # what `docker run --gpus all` sends
    assert host["ShmSize"] == 8 * 1024**3

    # Kubernetes: the base job template file is a valid work-pool template, and a deployment asking for 2 GPUs
    # gets a pod with an nvidia.com/gpu limit of 2
    k8s = json.loads(K8S_TEMPLATE.read_text())
    WorkPoolCreate(name="sslcook-k8s", type="kubernetes", base_job_template=k8s)
    validate({"gpus": 2, "image": "sslcook:latest"}, k8s["variables"], raise_on_error=True)
    with pytest.raises(ValidationError):
        validate({"gpus": -1}, k8s["variables"], raise_on_error=True)
    job = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(k8s, {"gpus": 2}))
    (container,) = job.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 and container["image"] == "sslcook:latest"
    assert "nvidia.com/gpu" in (PROJECT_ROOT / "README.md").read_text()


@pytest.mark.slow
def test_gpu_deployments_register_and_a_process_worker_runs_one(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.schema_tools import validate

    url, env = prefect_server
    run([*PREFECT, "work-pool", "create", GPU_POOL, "--type", "process"], PROJECT_ROOT, env=env, timeout=120)
    run([*PREFECT, "work-pool", "create", DOCKER_POOL, "--type", "docker"], PROJECT_ROOT, env=env, timeout=120)
    run(
        [*PREFECT, "--no-prompt", "deploy", "--name", "gpu", "--name", "gpu-docker"], PROJECT_ROOT, env=env, timeout=180
    )
    # the README's Kubernetes pool: the server takes the template file as the pool's base job template
    run(
        [
            *PREFECT,
            "work-pool",
            "create",
            "sslcook-k8s",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(K8S_TEMPLATE),
        ],
        PROJECT_ROOT,
        env=env,
        timeout=120,
    )
    toy = make_toy(tmp_path / "toy", methods=("alpha",))
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        for name, pool in (("gpu", GPU_POOL), ("gpu-docker", DOCKER_POOL)):
            deployment = client.read_deployment_by_name(f"sslcook-pipeline/{name}")
            expected = _deployment(name)["work_pool"]["job_variables"]
            assert deployment.work_pool_name == pool and deployment.job_variables == expected
            # the job variables fit the schema of the pool the server holds (the Docker worker's for docker)
            schema = client.read_work_pool(pool).base_job_template["variables"]
            assert validate(deployment.job_variables, schema) == []
        assert client.read_work_pool("sslcook-k8s").base_job_template == json.loads(K8S_TEMPLATE.read_text())
        docker_schema = client.read_work_pool(DOCKER_POOL).base_job_template["variables"]
        assert "container_create_kwargs" in docker_schema["properties"]
        gpu = client.read_deployment_by_name("sslcook-pipeline/gpu")
        client.create_work_queue(name="sslcook-gpu-test", work_pool_name=GPU_POOL)
        triggered = client.create_flow_run_from_deployment(
            gpu.id, parameters={"workspace": str(toy)}, work_queue_name="sslcook-gpu-test"
        )
    worker = run(
        [
            *PREFECT,
            "worker",
            "start",
            "--pool",
            GPU_POOL,
            "--work-queue",
            "sslcook-gpu-test",
            "--run-once",
            "--limit",
            "1",
        ],
        PROJECT_ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        state = client.read_flow_run(triggered.id).state
    assert state is not None and state.type == StateType.COMPLETED, (
        f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    )
    assert (toy / "dvc.lock").exists()
