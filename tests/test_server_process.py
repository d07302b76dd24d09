"""`bliss serve` as a real process: scoring, health, metrics, JSON logs, SIGTERM drain."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bliss.cli import COMMAND_MODULES, build_parser, main
from bliss.client import Batch, BlissClient
from tests.cli_runner import run_cli
from tests.serving_fixtures import build_from_embeddings, embedding_items_match, local_lines
from tests.synthetic_embeddings import synthetic_world

# The console script of this environment: the very command operators run.
BLISS = str(Path(sys.executable).with_name("bliss"))
ANNOUNCEMENT = re.compile(r"bliss serve listening on 127\.0\.0\.1:(\d+) \(metrics: port (\d+)\)")


def start_serving(data, *extra: str) -> tuple[subprocess.Popen, int, int]:
    assert "bliss.server.commands" in COMMAND_MODULES, (
        "`bliss serve` is not a command: add 'bliss.server.commands' to COMMAND_MODULES in "
        "bliss/cli.py"
    )
    command = [
        BLISS, "serve", "--data-dir", str(data),
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
        "--metrics-port", "0", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = process.stdout.readline()
    match = ANNOUNCEMENT.search(line)
    if match is None:
        process.kill()
        raise AssertionError(f"bliss serve did not start: {line!r} {process.stderr.read()}")
    return process, int(match.group(1)), int(match.group(2))


def test_bliss_serve_scores_reports_and_drains_on_sigterm(tmp_path, capsys):
    world = synthetic_world(classes=3, entries=120, per_class=12, tests=6, seed=8)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    np.save(tmp_path / "test.npy", world.test)
    process, port, metrics_port = start_serving(
        data, "--log-format", "json", "--shutdown-delay-s", "1", "--grace-period-s", "20"
    )
    address = f"127.0.0.1:{port}"
    try:
        assert main(["health", "--server", address]) == 0
        assert capsys.readouterr().out == f"{address} SERVING\n"
        remote = run_cli(
            "score", "--server", address, "--embeddings", tmp_path / "test.npy", data_dir=data
        )
        assert remote.code == 0, remote.stderr
        local = local_lines(data, None, "--index", "demo", "--embeddings", tmp_path / "test.npy")
        embedding_items_match([json.loads(line) for line in remote.stdout.splitlines()], local)

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
            metrics = page.read().decode()
        assert 'bliss_requests_total{code="OK",method="Score"} 1.0' in metrics
        assert 'bliss_index_version_loaded{index="demo"} 1.0' in metrics
        assert "bliss_request_latency_seconds_bucket" in metrics

        # A stream open across SIGTERM: it keeps being served until the client ends it.
        outbox: queue.Queue[Batch | None] = queue.Queue()
        with BlissClient(address, max_retries=0) as client:
            replies = client.score_stream(iter(outbox.get, None))
            outbox.put(Batch(embeddings=world.test[:2]))
            assert len(next(replies)) == 2
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while client.health() != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            outbox.put(Batch(embeddings=world.test[2:5]))
            assert len(next(replies)) == 3  # the in-flight call is still served
            outbox.put(None)
            assert list(replies) == []
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages)
    assert "received SIGTERM" in messages and messages[-1] == "stopped"
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in logs)


def test_bliss_serve_refuses_bad_settings(tmp_path):
    result = run_cli("serve", "--port", "70000", data_dir=tmp_path)
    assert result.code == 2
    assert "error: bad server setting: --port / BLISS_PORT: Input should be less" in result.stderr
    result = run_cli("serve", "--tls-cert", "x.pem", data_dir=tmp_path)
    assert result.code == 2
    assert "TLS needs both tls_cert and tls_key" in result.stderr


def test_settings_come_from_flags_then_environment(tmp_path, monkeypatch):
    from bliss.server.commands import load_server_settings

    monkeypatch.setenv("BLISS_PORT", "6000")
    monkeypatch.setenv("BLISS_MAX_BATCH_ITEMS", "99")
    monkeypatch.setenv("BLISS_AUTH_TOKEN", "from-env")
    args = build_parser().parse_args(["serve", "--port", "7000", "--data-dir", str(tmp_path)])
    settings = load_server_settings(args)
    assert (settings.port, settings.max_batch_items) == (7000, 99)
    assert settings.bearer_token() == "from-env"
    assert settings.data_dir == tmp_path


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_file_is_refused(tmp_path, value):
    from bliss.errors import InvalidInputError
    from bliss.server.settings import ServerSettings

    token_file = tmp_path / "token"
    token_file.write_text(value)
    with pytest.raises(InvalidInputError, match="the bearer token is empty"):
        ServerSettings(data_dir=tmp_path, auth_token_file=token_file).bearer_token()


def test_a_busy_port_is_a_clear_error(tmp_path):
    world = synthetic_world(classes=2, entries=30, per_class=5, tests=1, seed=2)
    data = tmp_path / "data"
    build_from_embeddings(world, tmp_path / "bundle", data)
    process, port, _ = start_serving(data)
    try:
        second = run_cli(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--no-metrics", data_dir=data
        )
        assert second.code == 2
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
