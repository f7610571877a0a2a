"""Tasks derived from a COCO dataset, their prompts, splits and ground truth.

A task is a stable id + a predicate over annotations + prompt paraphrases:

- ``category:car`` ("segment all cars"), one per category;
- ``supercategory:vehicle`` ("segment vehicles"), one per supercategory with 2+ categories;
- ``color:red`` ("segment red objects"), one per attribute value;
- ``color:red+category:car`` ("segment all red cars"), one per attribute x category pair seen.

Prompts come from `TEMPLATES`; the last `NUM_HELDOUT_TEMPLATES` are held-out paraphrases, never
trained on. One attribute x category pair per category (rotating through its attribute values,
so every value is held out somewhere) is held out entirely: the composition test.
Everything is deterministic in the dataset's categories and attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from talora.data.coco import CocoDataset, Instance

# {pl}: plural phrase ("red cars"), {sg}: singular ("red car"). "segment {pl}" is the card's own
# phrasing ("segment vehicles"), so it is a training template.
TEMPLATES = (
    "segment {pl}",
    "segment all {pl}",
    "segment the {pl}",
    "highlight every {sg}",
    "find the {pl}",
    "mask each {sg} in the image",
    "show me all {pl}",
    "outline the {pl}",
    "select every {sg}",
    "mark all {pl}",
    "cut out the {pl}",
    "label every {sg}",
    # held out: never seen in training
    "where are the {pl}?",
    "give me masks of all {pl}",
    "isolate each {sg}",
    "pick out the {pl} in this picture",
)
NUM_HELDOUT_TEMPLATES = 4

GROUPS = ("seen", "heldout_paraphrase", "heldout_composition")

_IRREGULAR = {"person": "people", "fruit": "fruit", "sheep": "sheep", "mouse": "mice", "child": "children",
              "man": "men", "woman": "women", "foot": "feet", "knife": "knives", "leaf": "leaves",
              "skis": "skis", "scissors": "scissors", "glasses": "glasses"}


def pluralize(noun: str) -> str:
    """English plural of the last word of `noun` ("traffic light" -> "traffic lights", "bus" -> "buses")."""
    head, _, last = noun.rpartition(" ")
    low = last.lower()
    if low in _IRREGULAR:
        plural = _IRREGULAR[low]
    elif re.search(r"(s|x|z|ch|sh)$", low):
        plural = last + "es"
    elif re.search(r"[^aeiou]y$", low):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@dataclass(frozen=True)
class Task:
    id: str
    kind: str  # category | supercategory | attribute | composition
    singular: str  # "red car"
    plural: str  # "red cars"
    predicate: tuple[tuple[str, str], ...]  # (field, value): category, supercategory or attr:<name>
    heldout: bool = False  # a held-out composition: no prompt of it is trained on

    def matches(self, instance: Instance) -> bool:
        for key, value in self.predicate:
            if key == "category":
                ok = instance.category == value
            elif key == "supercategory":
                ok = instance.supercategory == value
            else:
                ok = instance.attribute(key.removeprefix("attr:")) == value
            if not ok:
                return False
        return True

    def prompts(self) -> list[str]:
        return [t.format(sg=self.singular, pl=self.plural) for t in TEMPLATES]

    @property
    def train_prompts(self) -> list[str]:
        return [] if self.heldout else self.prompts()[: len(TEMPLATES) - NUM_HELDOUT_TEMPLATES]

    @property
    def heldout_prompts(self) -> list[str]:
        return self.prompts() if self.heldout else self.prompts()[len(TEMPLATES) - NUM_HELDOUT_TEMPLATES :]

    def group_of(self, prompt: str) -> str:
        """seen / heldout_paraphrase / heldout_composition, for one of this task's prompts."""
        if self.heldout:
            return "heldout_composition"
        return "seen" if normalize_prompt(prompt) in map(normalize_prompt, self.train_prompts) else "heldout_paraphrase"


class TaskSet:
    """The tasks of a dataset, with prompt -> task lookup."""

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self.by_id = {t.id: t for t in tasks}
        self._by_prompt = {}
        for t in tasks:
            for p in t.prompts():
                self._by_prompt.setdefault(normalize_prompt(p), t)

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def for_prompt(self, prompt: str) -> Task | None:
        """The task whose paraphrase `prompt` is (case and spacing aside), else None."""
        return self._by_prompt.get(normalize_prompt(prompt))

    @classmethod
    def from_dataset(cls, dataset: CocoDataset, attribute_names: tuple[str, ...] | None = None) -> TaskSet:
        instances = [i for i in dataset.all_instances() if not i.iscrowd]
        categories = sorted(dataset.categories.values(), key=lambda c: c["id"])
        tasks = [Task(f"category:{c['name']}", "category", c["name"], pluralize(c["name"]), (("category", c["name"]),))
                 for c in categories]

        supers: dict[str, list[str]] = {}
        for c in categories:
            supers.setdefault(c["supercategory"], []).append(c["name"])
        for name, members in supers.items():
            if len(members) >= 2 and name not in members:  # a 1-category supercategory adds nothing
                tasks.append(Task(f"supercategory:{name}", "supercategory", name, pluralize(name),
                                  (("supercategory", name),)))

        # Attribute values, and which categories each appears with, from the annotations.
        seen_pairs: dict[tuple[str, str], set[str]] = {}
        for inst in instances:
            for attr, value in inst.attributes:
                if attribute_names is None or attr in attribute_names:
                    seen_pairs.setdefault((attr, value), set()).add(inst.category)
        for attr, value in sorted(seen_pairs):
            tasks.append(Task(f"{attr}:{value}", "attribute", f"{value} object", f"{value} objects",
                              ((f"attr:{attr}", value),)))

        for k, c in enumerate(categories):
            values = sorted((attr, value) for (attr, value), cats in seen_pairs.items() if c["name"] in cats)
            heldout = values[k % len(values)] if len(values) >= 2 else None  # rotate so every value is held out somewhere
            for attr, value in values:
                tasks.append(Task(
                    f"{attr}:{value}+category:{c['name']}", "composition", f"{value} {c['name']}",
                    f"{value} {pluralize(c['name'])}", ((f"attr:{attr}", value), ("category", c["name"])),
                    heldout=(attr, value) == heldout,
                ))
        return cls(tasks)


# --- ground truth -----------------------------------------------------------------------------


def task_instances(task: Task, instances: list[Instance]) -> list[Instance]:
    return [i for i in instances if task.matches(i)]


def semantic_mask(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """Union of the instances' masks (crowd regions excluded): (height, width) bool."""
    mask = np.zeros((height, width), dtype=bool)
    for inst in instances:
        if not inst.iscrowd:
            mask |= inst.mask()
    return mask


def task_ground_truth(dataset: CocoDataset, tasks: TaskSet) -> dict:
    """A COCO instances dict whose categories are the tasks (category id = task index + 1), so
    COCOeval scores any task like a category. Crowd annotations keep iscrowd (COCOeval ignores them)."""
    categories = [{"id": i + 1, "name": t.id, "supercategory": t.kind} for i, t in enumerate(tasks)]
    annotations = []
    for image_id in dataset.image_ids:
        for inst in dataset.instances[image_id]:
            for i, task in enumerate(tasks):
                if task.matches(inst):
                    annotations.append({
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": i + 1,
                        "segmentation": {"size": inst.rle["size"], "counts": inst.rle["counts"].decode("ascii")},
                        "area": inst.area,
                        "bbox": list(inst.bbox),
                        "iscrowd": int(inst.iscrowd),
                    })
    images = [{"id": r.id, "file_name": r.file_name, "width": r.width, "height": r.height}
              for r in (dataset.images[i] for i in dataset.image_ids)]
    return {"images": images, "annotations": annotations, "categories": categories}
