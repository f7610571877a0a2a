# talora — set-up, tests and the demo. Every target builds the venv first (idempotent).
PYTHON     ?= python3
VENV       ?= .venv
# Installed before the package so pip never resolves an unpinned torch (a multi-GB download).
# Override for another CUDA build, e.g. make setup TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY         := $(VENV)/bin/python
OFFLINE    := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
PYTEST_ARGS ?=
DEMO_PROMPT ?= segment vehicles

.PHONY: setup test test-unit test-integration demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(OFFLINE) $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: setup
	$(OFFLINE) $(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(OFFLINE) $(PY) -m pytest -m integration $(PYTEST_ARGS)

# The embedded default, end to end: the demo bucket (generated if missing) -> the labelling job on
# a local Ray with two prompts -> the evaluation report -> overlays. Until the demo models ship
# (the demo-models issue), the labelling model is an untrained hypernet, so scores are ~0.
DEMO_DATA ?= data/demo
DEMO_PROMPT2 ?= segment red objects
demo: setup
	test -f $(DEMO_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data --out $(DEMO_DATA) \
		--num-images 200 --num-val 40 --shard-size 20 --seed 0
	$(OFFLINE) $(PY) jobs/segment_dataset.py --prompt "$(DEMO_PROMPT)" --prompt "$(DEMO_PROMPT2)" \
		--images $(DEMO_DATA)/val/images --annotations $(DEMO_DATA)/val/instances.json \
		--output runs/demo/labels --points-per-side 8 --presence-thresh 0 2>&1 | grep -E '^(label|\{)'
	$(OFFLINE) $(PY) jobs/evaluate.py --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--annotations $(DEMO_DATA)/val/instances.json --output runs/demo/eval
	$(OFFLINE) $(VENV)/bin/talora viz --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--out runs/demo/overlays --max-images 6
	@echo "demo outputs: $(DEMO_DATA)/ (COCO train/val), runs/demo/labels/ (Parquet predictions),"
	@echo "              runs/demo/eval/report.md (+ report.json, per_task_ap.png), runs/demo/overlays/*.png"

clean:
	rm -rf runs .pytest_cache
