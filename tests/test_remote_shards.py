"""Shards from remote storage: the loader streams them from URLs, checking each against the manifest first.

A local HTTP server (127.0.0.1, started here, stopped by shutdown) serves a shard set: `pretrain.shards_url`
pointing at it trains exactly as the local shards do, with no data/shards in the workspace; a served shard with
one byte changed is named in a one-line error and none of its samples is used."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ssl_models.data import DataError, make_loader, read_manifest, shard_urls
from support.tiny_ssl import make_stage_workspace, write_tiny_shards

PROJECT = Path(__file__).resolve().parents[1]
PRETRAIN = {"epochs": 1, "batch_size": 16, "num_workers": 1}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D102 - keep the test output clean
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("remote") / "shards", train=64, test=32)


@pytest.fixture()
def serve(tmp_path):
    """serve(folder) -> base URL of an HTTP server on 127.0.0.1 serving ``folder``; shut down after the test."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/shards"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _served(tmp_path: Path, shards: Path) -> Path:
    root = tmp_path / "www"
    shutil.copytree(shards, root / "shards")
    return root


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _batches(urls, **kw) -> list:
    return list(make_loader(urls, batch_size=16, shuffle_buffer=32, seed=3, return_keys=True, **kw))


def test_loader_streams_http_shards_as_the_local_ones(shards, tmp_path, serve):
    base = serve(_served(tmp_path, shards))
    assert read_manifest(base) == read_manifest(shards)
    urls = shard_urls(base, "train")
    assert urls == [f"{base}/train-000000.tar", f"{base}/train-000001.tar"]
    for workers in (0, 1):
        remote, local = _batches(urls, num_workers=workers), _batches(shard_urls(shards, "train"), num_workers=workers)
        assert len(remote) == len(local) == 4
        for (rv, ry, rk), (lv, ly, lk) in zip(remote, local):
            assert rk == lk and torch.equal(ry, ly) and torch.equal(rv, lv) and rv.dtype == torch.uint8


def test_a_tampered_remote_shard_is_named_and_not_used(shards, tmp_path, serve):
    root = _served(tmp_path, shards)
    _tamper(root / "shards" / "train-000001.tar")
    base = serve(root)
    urls = shard_urls(base, "train")
    loader = make_loader(urls, batch_size=4, shuffle_buffer=0, return_keys=True)
    seen = []
    with pytest.raises(DataError) as err:
        for _, _, keys in loader:
            seen.extend(keys)
    message = str(err.value)
    assert message.startswith(f"{base}/train-000001.tar: remote shard modified") and message.endswith("not used")
    assert "\n" not in message
    # the good shard's samples went through (its last batch waits for a next sample that never comes), none of
    # the bad one's
    assert len(seen) >= 28 and all(k < "train_000032" for k in seen)


def _stage(ws: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT), WANDB_DIR=str(tmp_path / "wandb"))
    return subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "--method", "simclr"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_pretrain_from_shards_url_trains_as_local_shards_and_refuses_a_tampered_one(shards, tmp_path, serve):
    root = _served(tmp_path, shards)
    base = serve(root)
    local = make_stage_workspace(tmp_path / "local", shards, pretrain=PRETRAIN)
    remote = make_stage_workspace(tmp_path / "remote", shards, pretrain={**PRETRAIN, "shards_url": base})
    shutil.rmtree(remote / "data" / "shards")  # nothing local: every shard comes over HTTP
    for ws in (local, remote):
        proc = _stage(ws, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(local / "runs" / "simclr" / "checkpoint.pt", weights_only=True)
    b = torch.load(remote / "runs" / "simclr" / "checkpoint.pt", weights_only=True)
    assert b["config"]["pretrain"]["shards_url"] == base
    for key, value in a["method_state"].items():
        assert torch.equal(b["method_state"][key], value), key

    _tamper(root / "shards" / "train-000000.tar")
    bad = make_stage_workspace(tmp_path / "bad", shards, pretrain={**PRETRAIN, "shards_url": base})
    shutil.rmtree(bad / "data" / "shards")
    proc = _stage(bad, tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and f"{base}/train-000000.tar: remote shard modified" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # the stage checked runs/simclr/ is writable before training (so the folder may exist): no output in it
    assert sorted(p.name for p in (bad / "runs" / "simclr").glob("*")) == []
