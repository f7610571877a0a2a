"""The quality suite's results as files: JSON, a Markdown table and the per-method plot."""

from __future__ import annotations

import json

import numpy as np

from talora.bench.quality.config import METHODS
from talora.bench.report import write_files
from talora.data.tasks import GROUPS
from talora.io.images import figure_png, pyplot
from talora.io.storage import StorageOptions
from talora.markdown import fmt, table


def markdown(results: dict) -> str:
    """results.md: one table per group (methods x mIoU / AP / AP50), the oracles, the targets."""
    q, c, m = results["quality"], results["config"], results["machine"]
    lines = [f"# Quality suite: {c['val_images']} images of {c['val_annotations']}", "",
             f"Hypernet {c['hypernet']} on {c['sam_checkpoint']}; {c['tasks']} tasks; "
             f"{c['points_per_side']}x{c['points_per_side']} instance grid; {m['name']}, torch {m['torch']}.", ""]
    for group, methods in q["groups"].items():
        if methods is None:
            lines += [f"**{group}**: absent (no such tasks in this dataset)", ""]
            continue
        refs = q["references"].get(group) or {}
        lines += [f"**{group}** ({next(v for v in methods.values() if v)['tasks']} tasks; references: "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in refs.items()) + ")", ""]
        lines += table(["method", "task mIoU", "mask AP", "AP50"],
                       [[name, v["miou"], v["ap"], v["ap50"]] for name, v in methods.items() if v]) + [""]
    if q["oracles"]:
        lines += table(["oracle task", "static LoRA mIoU", "hypernet mIoU", "hypernet / oracle"],
                       [[o["task"], o["oracle_miou"], o["hypernet_miou"], o["ratio"]] for o in q["oracles"]]) + [""]
    lines += table(["target", "measured", "target", "met"],
                   [[k, v["value"], v["target"], v["met"]] for k, v in q["targets"].items()])
    oracle = q["targets"]["hypernet_vs_oracle"]
    if oracle["median"] is not None:
        lines += ["", f"hypernet / oracle: mean {fmt(oracle['value'])}, median {fmt(oracle['median'])}."]
    collapsed = oracle["collapsed_oracles"]
    if collapsed:
        lines += ["", f"{collapsed} oracle(s) collapsed to empty masks: their ratio is undefined and left out of the mean."]
    if "ablations" in q:
        a = q["ablations"]
        lines += ["", f"Ablations ({a['steps']} steps each):", ""]
        lines += table(["variant", "k", "adapter", "generated values", "s per prompt", *GROUPS],
                       [[k, v["tail_blocks"], v["adapter_type"], v["generated_values_per_adapter"], v["s_per_prompt"],
                         *(v[f"miou_{g}"] for g in GROUPS)] for k, v in a.items() if k != "steps"])
    return "\n".join(lines) + "\n"


def plot_methods(results: dict) -> bytes:
    """Mask AP and task mIoU per method on the seen group, as PNG bytes."""
    plt = pyplot()

    seen = results["quality"]["groups"].get("seen") or {}
    names = [n for n in METHODS if seen.get(n)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [seen[n]["ap"] for n in names], 0.4, label="mask AP")
    ax.bar(x + 0.2, [seen[n]["miou"] or 0.0 for n in names], 0.4, label="task mIoU")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(ylim=(0, 1), title="seen prompts, same base and images")
    ax.legend()
    return figure_png(fig)


def write_results(results: dict, out: str, storage: StorageOptions | None = None) -> list[str]:
    """results.json, results.md and methods.png under `out`; returns the files."""
    return write_files({"results.json": json.dumps(results, indent=1).encode(), "results.md": markdown(results).encode(),
                        "methods.png": plot_methods(results)}, out, storage)
