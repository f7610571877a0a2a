"""The GPU check: every GPU path of talora in one command on a lent device, or its CPU twin.

    python jobs/gpu_check.py carry [--out .gpu-carry]     # here (PyPI reachable): the wheels the device lacks
    python jobs/gpu_check.py run --out DIR                # there: install the carry, then every section
    python jobs/gpu_check.py run --dry-run --out DIR      # anywhere: the same script on the CPU, tiny presets

`make gpu-carry`, `make gpu-check` and `make gpu-check DRY=1` run these. `run` writes
DIR/results.json, DIR/results.md and a log per section, and prints a one-screen summary; it
exits 0 when every section ran (a missed target is a number, not a failure), 1 otherwise.
See talora.bench.carry (what travels and how it installs) and talora.bench.gpu (the sections).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_carry():
    """talora.bench.carry from its file: on the device talora's package cannot be imported before
    the carry is installed (it checks its dependencies on import), and this module is stdlib-only."""
    spec = importlib.util.spec_from_file_location("talora_carry", REPO / "talora" / "bench" / "carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("carry", help="build the carry folder for the device (needs PyPI and `make setup`)")
    c.add_argument("--out", default=str(REPO / ".gpu-carry"))
    c.add_argument("--python", default="3.12", help="the device's Python (major.minor)")
    c.add_argument("--platform", default="manylinux2014_x86_64", help="the device's wheel platform tag")
    r = sub.add_parser("run", help="the check (installs the carry first where modules are missing)")
    r.add_argument("--out", required=True, help="a local folder for results.json, results.md and the logs")
    r.add_argument("--dry-run", action="store_true", help="on the CPU with the tiny presets and a few images")
    r.add_argument("--carry", default=str(REPO / ".gpu-carry"))
    r.add_argument("--site", default=str(REPO / ".gpu-site"), help="where the carry is installed (pip --target)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    carry = load_carry()
    try:
        if args.command == "carry":
            sys.path.insert(0, str(REPO))
            from talora.bench.gpu import check_prompts

            carry.build_carry(Path(args.out), check_prompts(), args.python, args.platform)
            return 0
        prepared = carry.activate(Path(args.carry), Path(args.site))
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    from talora.bench.gpu import run_check, summary

    results = run_check(args.out, args.dry_run, prepared)
    print(summary(results))
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 0 if all(s["status"] == "ok" for s in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
