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

# The longest real end-to-end path that exists so far: the demo bucket (generated if missing) ->
# its tasks -> the embedding cache on a local Ray -> an adapter file for a prompt on vit_tiny.
DEMO_DATA ?= data/demo
demo: setup
	test -f $(DEMO_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data --out $(DEMO_DATA) \
		--num-images 200 --num-val 40 --shard-size 20 --seed 0
	$(OFFLINE) $(VENV)/bin/talora tasks --annotations $(DEMO_DATA)/val/instances.json | head -n 14
	$(OFFLINE) $(PY) jobs/embed_images.py --annotations $(DEMO_DATA)/val/instances.json \
		--output runs/demo/cache --batch-size 8 2>&1 | grep -E '^(embed|\{)'
	$(OFFLINE) $(VENV)/bin/talora adapter --prompt "$(DEMO_PROMPT)" --sam-type vit_tiny \
		--out runs/demo/adapter.safetensors
	@echo "demo outputs: $(DEMO_DATA)/ (COCO train/val), runs/demo/cache/ (embedding cache), runs/demo/adapter.safetensors"

clean:
	rm -rf runs .pytest_cache
