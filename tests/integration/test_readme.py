"""The README's commands as a new user types them, in a shell whose PATH does not hold the venv."""

import re
import subprocess
from pathlib import Path

import pytest

# Its `ray stop` (the README's own clean-up) stops every Ray on the machine: never beside another test.
pytestmark = [pytest.mark.integration, pytest.mark.serial]
REPO = Path(__file__).resolve().parents[2]


def _block(name: str) -> str:
    """The bash block between <!-- name --> and <!-- /name --> in the README."""
    found = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)```\s*<!-- /{name} -->", (REPO / "README.md").read_text(), re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


def test_the_readme_ray_job_on_this_machine_runs_as_written(tmp_path):
    import ray

    ray.shutdown()  # the head below takes Ray's default ports; the next test's ray_cluster starts a fresh Ray
    commands = _block("local-ray-head")
    assert "source .venv/bin/activate" in commands and "ray job submit" in commands
    script = "set -euo pipefail\ntrap 'ray stop > /dev/null 2>&1 || true' EXIT\n" + commands
    system_path = "/usr/local/bin:/usr/bin:/bin"  # a new shell: no venv on the PATH
    env = {"HOME": str(tmp_path), "PATH": system_path, "RAY_USAGE_STATS_ENABLED": "0", "LANG": "C.UTF-8"}
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log
    summary = [line for line in log.splitlines() if line.startswith('{"output"')][-1]
    assert '"images": 40' in summary and str(REPO / "runs" / "labels") in summary  # kept beside the checkout
