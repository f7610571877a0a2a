"""Shared fixtures: tiny models built from segment_anything's own classes, a moto S3 server on
loopback, and the offline text encoder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from talora.config import default_config
from talora.io.storage import StorageOptions

# Fake credentials only: moto accepts any, and nothing here may reach a real account.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


# Every Ray a test starts is a loopback-only cluster of its own: no token (subprocess jobs join it by
# address), no usage report. Set for the whole process, before whichever test starts Ray first.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log

# Under `make test` two xdist workers share two cores with the jobs and Ray workers they start: one
# torch thread per process (and per process it starts), since OpenMP threads that spin-wait for a core
# another process holds made a 1-s CPU test take 15-20 s. A serial run keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API (moto) on 127.0.0.1, one per session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server):
    """Fresh S3 state with one bucket, ``s3://talora-test``; yields the StorageOptions to reach it."""
    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).read()
    s3fs.S3FileSystem.clear_instance_cache()
    options = StorageOptions(endpoint_url=moto_server)
    fs = s3fs.S3FileSystem(endpoint_url=moto_server)
    fs.mkdir("talora-test")
    yield options
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def text_encoder():
    from talora.core.text import TextEncoder

    return TextEncoder()


@pytest.fixture
def tiny_config():
    return default_config("vit_tiny")


@pytest.fixture
def tiny_model(tiny_config):
    """An untrained vit_tiny TaskAwareSam in float64 (equivalence tests cannot flake)."""
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    return as_float64(build_task_aware_sam(tiny_config))


def as_float64(model):
    """model.double(), except SAM's point-encoding matrix: PromptEncoder casts point coordinates
    to float32 before multiplying by it (segment_anything 1.0), so it must stay float32."""
    model.double()
    for module in model.modules():
        if hasattr(module, "positional_encoding_gaussian_matrix"):
            module.positional_encoding_gaussian_matrix.data = module.positional_encoding_gaussian_matrix.float()
    return model


@pytest.fixture
def float64():
    return as_float64


@pytest.fixture
def make_adapter():
    """make_adapter(targets, rows=None, zero_b=False, seed=0): a random adapter over `targets`
    (shared when rows is None), float64, with B non-zero unless zero_b."""
    from talora.core.lora import Adapter

    def make(targets, rows=None, zero_b=False, seed=0, rank=4, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        lead = () if rows is None else (rows,)
        weights = {}
        for t in targets:
            a = torch.randn(*lead, rank, t.in_features, generator=g, dtype=torch.float64) * 0.2
            b = torch.randn(*lead, t.out_features, rank, generator=g, dtype=torch.float64) * 0.2
            weights[t.name] = (a, torch.zeros_like(b) if zero_b else b)
        return Adapter(weights, scale)

    return make


REPO = Path(__file__).resolve().parents[1]


def job_command(script: str, argv: list[str]) -> list[str]:
    """A job as a user runs it: `python jobs/<script>.py ARGV`, from the repository root."""
    return [sys.executable, str(REPO / "jobs" / f"{script}.py"), *argv]


def job_module(script: str):
    """jobs/<script>.py imported as a module (its parser and helpers), without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jobs_{script}", REPO / "jobs" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """A job's `main(argv)` in this process, on this process's Ray when a test started one: its exit
    code and what it printed (argparse's own errors included), as `run_job` returns them. For a
    test of what the job does rather than of the shell around it (one `run_job` per job proves that
    path), since a fresh interpreter costs seconds of imports each time."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = job_module(script).main(argv)
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def job_main(script: str, argv: list[str]) -> tuple[int, str]:
    """`run_here`'s exit code and stderr: for input a job must refuse before any work."""
    done = run_here(script, argv)
    return done.returncode, done.stderr


def run_job(script: str, argv: list[str], ray_address: str | None = None) -> subprocess.CompletedProcess:
    """Runs a job to its end (connected to `ray_address` when given); returns the finished process."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(job_command(script, argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def job_summary(done: subprocess.CompletedProcess) -> dict:
    """The JSON line a successful job prints last."""
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
