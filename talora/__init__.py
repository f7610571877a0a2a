"""talora: text-to-LoRA for Segment Anything.

Data flows one way: text -> hypernet -> adapter -> SAM (encoder tail + mask decoder) -> masks.
"""

import importlib.util as _util
import sys as _sys

from talora.backbones.variants import FAMILIES

__version__ = "0.1.0"

# A python without talora's dependencies (a Ray head started outside the venv runs every job's
# `python` from its own PATH) gets one sentence saying where to run from, not a deep traceback.
# A family installed without its dependencies (SAM 3) is not pip's to resolve: it is checked when
# one of its variants is built (talora.backbones), not here.
_needed = ("torch", "ray", "fsspec", "pyarrow", *(m for f in FAMILIES.values() if not f.no_deps for m in f.modules))
_missing = [m for m in _needed if _util.find_spec(m) is None]
if _missing:
    raise ModuleNotFoundError(
        f"talora needs {', '.join(_missing)}, which this python ({_sys.executable}) does not have: run it from "
        "the environment talora is installed in (make setup, then `source .venv/bin/activate`), and start a Ray "
        "head from that shell so that its jobs use it too")
