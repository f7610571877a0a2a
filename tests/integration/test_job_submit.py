"""`ray job submit` against a head started by the test on 127.0.0.1 (token auth off for loopback)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from talora.batch.cluster import free_port
from talora.data.synthetic import write_demo_dataset

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait_until(ready, what: str, timeout: float = 120.0) -> None:
    """Polls a condition (not a fixed sleep) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def _accepts_jobs(address: str) -> bool:
    """The head's job agent takes submissions (the HTTP server answers before the agent is up)."""
    import requests
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).submit_job(entrypoint="true")
        return True
    except requests.exceptions.ConnectionError:  # the dashboard dropped the request while its modules start
        return False
    except RuntimeError as e:
        if "No available agent" in str(e):
            return False
        raise


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback, in its own --block process so the test can stop exactly it."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")  # short: Ray's socket paths must fit 107 bytes
    # Its own agent ports too: the suite's in-process Ray already holds the defaults (52365, ...).
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", *agent_ports,
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until(lambda: _answers(f"{address}/api/version"), "the Ray head's job API")
        _wait_until(lambda: _accepts_jobs(address), "the Ray head's job agent")
        yield address, env
    finally:
        # Its own session (start_new_session): the head, its raylet, GCS and workers end together, at
        # once (SIGTERM let the head stop each in turn with a grace period: ~30 s); nothing of it is kept.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_working_dir_package_stays_small_with_venv_and_data_present(tmp_path):
    # What `ray job submit --runtime-env cluster/runtime_env.yaml` uploads: Ray's own packer,
    # honouring .gitignore and the runtime env's excludes (.git: a clone's history holds every
    # past version of the shipped models).
    from ray._private.runtime_env.packaging import _zip_files

    (REPO / "data").mkdir(exist_ok=True)  # a clone that holds data and (in CI) .venv
    out = tmp_path / "pkg.zip"
    excludes = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    _zip_files(str(REPO), excludes, str(out), include_gitignore=True)
    names = zipfile.ZipFile(out).namelist()
    models = sum(zipfile.ZipFile(out).getinfo(f"talora/assets/demo/{n}").compress_size
                 for n in ("sam_vit_tiny.safetensors", "hypernet.safetensors"))  # the shipped demo models travel too
    assert out.stat().st_size - models < 2 * 2**20 and models < 12 * 2**20, f"{out.stat().st_size} bytes"
    files = [n for n in names if not n.endswith("/")]  # an empty directory entry carries no bytes
    assert not any(n.startswith((".venv/", "data/", "runs/", ".git/")) for n in files)
    assert "jobs/segment_dataset.py" in names and "talora/label/job.py" in names


def test_ray_job_submit_runs_the_labelling_job_to_completion(head, tmp_path):
    address, env = head
    written = write_demo_dataset(str(tmp_path / "demo"), num_train=1, num_val=3, seed=6)
    output = tmp_path / "labels"
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/segment_dataset.py", "--prompt", "segment vehicles",
         "--images", str(tmp_path / "demo" / "val" / "images"), "--annotations", written["val"],
         "--output", str(output), "--points-per-side", "4"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    (summary,) = output.glob("*/_summary.json")
    assert '"images": 3' in summary.read_text()
    shutil.rmtree(output)
