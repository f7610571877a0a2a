"""The speed suite's results as files: JSON, a Markdown table and the prompts plot."""

from __future__ import annotations

import json

from talora.bench.report import write_files
from talora.io.images import figure_png, pyplot
from talora.io.storage import StorageOptions
from talora.markdown import table


def markdown(results: dict) -> str:
    """results.md: every number with its key, and the machine."""
    rows = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            rows.append([prefix, f"{value:.4g}" if isinstance(value, float) else value])

    walk("speed", results["speed"])
    m, c = results["machine"], results["config"]
    head = [f"# Speed suite: {c['sam_type']} on {m['name']} ({m['device']}, {m['torch_threads']} threads, "
            f"torch {m['torch']}, Ray {m['ray']})", "",
            f"{c['prompts']} prompts, {c['points_per_side']}x{c['points_per_side']} instance grid, "
            f"{c['timed_images']} timed images of {c['images']}; medians of "
            f"`torch.utils.benchmark` blocks.", ""]
    return "\n".join(head + table(["key", "value"], rows)) + "\n"


def plot_prompts(results: dict) -> bytes:
    """Seconds per image against the number of prompts (floor path), as PNG bytes."""
    plt = pyplot()

    ks = sorted(results["speed"]["prompts"], key=int)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([int(k) for k in ks], [results["speed"]["prompts"][k]["s_per_image"] * 1e3 for k in ks], marker="o")
    ax.set(xlabel="prompts per image", ylabel="ms per image", title=f"floor, {results['config']['sam_type']}",
           xticks=[int(k) for k in ks])
    return figure_png(fig)


def write_results(results: dict, out: str, storage: StorageOptions | None = None) -> list[str]:
    """results.json, results.md and prompts.png under `out`; returns the files."""
    return write_files({"results.json": json.dumps(results, indent=1).encode(), "results.md": markdown(results).encode(),
                        "prompts.png": plot_prompts(results)}, out, storage)
