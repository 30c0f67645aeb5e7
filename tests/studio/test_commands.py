"""The studio's commands as a user runs them: `dataengine run` says what waits for a human and how
to open it, `dataengine studio OUT_DIR` serves that output, `dataengine serve studio` serves a
deployment's orchestrator and decoder (each a separate process over loopback)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from services.app.cli import app
from services.common.sam_models import save_random_checkpoint
from services.decoder.servicer import add_to_server as add_decoder
from services.orchestrator.servicer import add_to_server as add_orchestrator
from tests.servers import free_port, grpc_loopback, stop_process
from tests.studio.conftest import Studio, picture

GRID = '{"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}'


@contextlib.contextmanager
def studio_process(args: list[str], env: dict[str, str], log: Path):
    """`dataengine ARGS` in its own process; yields its base URL once /healthz answers."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.app.cli", *args, "--port", str(port)] if args[0] == "studio"
                                else [sys.executable, "-m", "services.app.cli", *args],
                                env={**os.environ, "DATAENGINE_STUDIO_PORT": str(port), **env},
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the studio exited with {proc.returncode}: {log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"the studio did not start: {log.read_text()}")
            time.sleep(0.2)
        yield url, proc
    finally:
        stop_process(proc, timeout=30)


@pytest.mark.slow
def test_run_then_dataengine_studio_on_its_output(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        picture(i).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(photos), "--out", str(out), "--model-type", "tiny",
                                      "--checkpoint", str(tiny_checkpoint), "--stage", "1", "--amg-params", GRID])
    assert result.exit_code == 0, result.output
    assert "2 items wait for a human (review: 2, fix queue: 0)" in result.output
    command = f"dataengine studio {out} --model-type tiny --checkpoint {tiny_checkpoint}"
    assert command in result.output and f"dataengine refresh {out}" in result.output

    args = command.split()[1:]
    with studio_process(args, {}, tmp_path / "studio.log") as (url, proc):
        headers = {"X-Annotator": "ann"}
        assert httpx.get(f"{url}/api/queue", headers=headers).json()["bands"]["stage1"] == 2
        item = httpx.post(f"{url}/api/next", headers=headers).json()
        click = httpx.post(f"{url}/api/items/{item['item_id']}/predict", headers=headers,
                           json={"points": [{"x": 100, "y": 100, "label": 1}]}, timeout=60)
        assert click.status_code == 200 and len(click.json()["candidates"]) == 3
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "<html" in page.text.lower()
    assert proc.returncode == 0, (tmp_path / "studio.log").read_text()
    assert "2 items wait for a human" in (tmp_path / "studio.log").read_text()


def test_dataengine_studio_refuses_what_it_cannot_serve(studio_run, tmp_path, tiny_checkpoint):
    out, _ = studio_run
    result = CliRunner().invoke(app, ["studio", str(tmp_path / "nowhere"), "--model-type", "tiny",
                                      "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 1 and "holds no engine store" in result.output
    other = save_random_checkpoint("tiny", tmp_path / "other.pth", seed=1)
    result = CliRunner().invoke(app, ["studio", str(out), "--model-type", "tiny", "--checkpoint", str(other)])
    said = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1 and "were embedded by tiny-" in said and "pass the --model-type" in said


@pytest.mark.slow
def test_dataengine_serve_studio_over_grpc_servers(studio: Studio, tmp_path):
    backend = studio.backend
    with grpc_loopback(lambda s: add_orchestrator(s, backend.orchestrator), 16 << 20) as (_, orch), \
            grpc_loopback(lambda s: add_decoder(s, backend.decoder), 16 << 20) as (_, dec):
        env = {"DATAENGINE_ORCHESTRATOR_ADDRESS": orch, "DATAENGINE_DECODER_ADDRESS": dec,
               "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(studio.out),
               "DATAENGINE_BUCKET": ".dataengine"}
        with studio_process(["serve", "studio"], env, tmp_path / "serve.log") as (url, proc):
            headers = {"X-Annotator": "bob"}
            assert httpx.get(f"{url}/api/queue", headers=headers).json()["waiting"] == 3
            item = httpx.post(f"{url}/api/next", headers=headers).json()
            assert item["item_id"] == studio.items["stage2"]
            image = httpx.get(f"{url}{item['image_url']}", headers=headers)
            assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
            click = httpx.post(f"{url}/api/items/{item['item_id']}/predict", headers=headers, timeout=60,
                               json={"box": {"x0": 40, "y0": 60, "x1": 150, "y1": 200}, "multimask": False})
            assert click.status_code == 200 and len(click.json()["candidates"]) == 1
        assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    assert studio.manifest("stage2").lease.annotator == "bob"


def test_dataengine_refresh_refuses_what_is_no_run(studio_run, tmp_path):
    out, _ = studio_run
    nowhere = CliRunner().invoke(app, ["refresh", str(tmp_path / "nowhere")])
    assert nowhere.exit_code == 1 and "holds no run" in " ".join(nowhere.output.split())
    (out / "report.json").write_text("[1, 2")
    broken = CliRunner().invoke(app, ["refresh", str(out)])
    assert broken.exit_code == 1 and "is not a run report" in " ".join(broken.output.split())
