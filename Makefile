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

.PHONY: setup test test-slow test-unit test-integration demo bench bench-scale bench-other demo-models demo-compare gpu-carry gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# SAM 2.1's package is an sdist with an optional CUDA extension: built against the torch above,
	# without the extension (its post-processing is not on talora's path) and without isolation.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation 'sam2==1.1.0'
	$(PY) -m pip install --quiet -e '.[dev]'
	# Ultralytics reads the YOLO exports back (tests, make demo): without its dependencies, whose
	# opencv-python would shadow the headless OpenCV above and needs libGL; what it imports is here.
	$(PY) -m pip install --quiet --no-deps 'ultralytics==8.4.190' 'ultralytics-thop>=2.0'
	# SAM 3's wheel pins numpy and huggingface_hub below what talora runs: without its dependencies, with
	# what its image model imports (open_clip_torch's wheel ships the BPE vocabulary its tokenizer reads).
	$(PY) -m pip install --quiet --no-deps 'sam3==0.1.4' 'timm>=1.0.17' 'ftfy>=6.1,<6.4' 'einops>=0.8,<0.9' \
		'wcwidth' 'open_clip_torch>=3'
	touch $@

# The suite runs in TEST_WORKERS processes, a test file to each (its module fixtures built once), each
# process with its own local Ray and moto server: a test is mostly one process waiting on another
# (a job's start-up, Ray's actors), so two share two cores well. Then the `serial` tests, alone.
# Exit code 5 is pytest's "nothing selected" (a PYTEST_ARGS subset with no serial test in it).
TEST_WORKERS ?= 2
test: setup
	$(OFFLINE) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not gpu and not slow and not serial" $(PYTEST_ARGS)
	$(OFFLINE) $(PY) -m pytest -m "serial and not gpu and not slow" $(PYTEST_ARGS) || test $$? -eq 5

# The benchmark-like tests: whole suite runs, the 10^6-file bucket, the GPU check's dry run.
test-slow: setup
	$(OFFLINE) $(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-unit: setup
	$(OFFLINE) $(PY) -m pytest -m "not slow" tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(OFFLINE) $(PY) -m pytest -m "integration and not slow" $(PYTEST_ARGS)

# The embedded default, end to end: the demo bucket (generated if missing) -> the labelling job on
# a local Ray with two prompts and the shipped demo models -> the evaluation report -> overlays.
DEMO_DATA ?= data/demo
DEMO_PROMPT2 ?= segment red objects
demo: setup
	test -f $(DEMO_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data --out $(DEMO_DATA) \
		--num-images 200 --num-val 40 --shard-size 20 --seed 0
	$(OFFLINE) $(PY) jobs/segment_dataset.py --prompt "$(DEMO_PROMPT)" --prompt "$(DEMO_PROMPT2)" \
		--images $(DEMO_DATA)/val/images --annotations $(DEMO_DATA)/val/instances.json \
		--output runs/demo/labels --points-per-side 8 2>&1 | grep -E '^(label|\{)'
	$(OFFLINE) $(PY) jobs/evaluate.py --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--annotations $(DEMO_DATA)/val/instances.json --output runs/demo/eval
	$(OFFLINE) $(VENV)/bin/talora viz --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--out runs/demo/overlays --max-images 6
	rm -rf runs/demo/export
	$(OFFLINE) $(VENV)/bin/talora export --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--format coco --out runs/demo/export/coco --val-fraction 0.2 --read-back
	$(OFFLINE) $(VENV)/bin/talora export --predictions $$(ls -td runs/demo/labels/*/ | head -n 1) \
		--format yolo --out runs/demo/export/yolo --val-fraction 0.2 --image-files link --read-back
	@echo "demo outputs: $(DEMO_DATA)/ (COCO train/val), runs/demo/labels/ (Parquet predictions),"
	@echo "              runs/demo/eval/report.md (+ report.json, per_task_ap.png), runs/demo/overlays/*.png,"
	@echo "              runs/demo/export/{coco,yolo}/ (the labels as datasets a detector trains on as they are)"

# Both benchmark suites on the demo domain with the shipped models (never part of `make test`): the
# speed suite (1000 generated images, the job end to end) and the quality suite (its 6 static-LoRA
# oracles are the only training; a finished oracle of the same config is reused on a rerun).
BENCH_OUT ?= runs/bench
bench: setup
	$(OFFLINE) $(PY) jobs/benchmark.py --suite speed --out $(BENCH_OUT)/speed
	$(OFFLINE) $(PY) jobs/benchmark.py --suite quality --out $(BENCH_OUT)/quality

# The quality suite on a domain the shipped models never saw (other colours, checker backgrounds,
# smaller objects): a vit_tiny base pretrained on it (2000 steps), then a hypernet trained by the
# suite itself (--hypernet-steps) and its oracles.
OTHER_DATA ?= data/other
OTHER_RUNS ?= runs/other
# The scale suite: the labelling driver on a generated bucket of 10^6 empty files against one of 10^4
# (planning per shard, driver memory, time to the first committed shard); about 3 minutes.
bench-scale: setup
	$(OFFLINE) $(PY) jobs/benchmark.py --suite scale --out $(BENCH_OUT)/scale

bench-other: setup
	test -f $(OTHER_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data --out $(OTHER_DATA) \
		--num-images 6000 --num-val 100 --seed 1 --palette other --background checker --min-size 40 --max-size 120
	$(OFFLINE) $(PY) jobs/train_hypernet.py --config configs/demo_pretrain.yaml --max-steps 2000 --val-every 2000 \
		--train-annotations $(OTHER_DATA)/train/instances.json --val-annotations $(OTHER_DATA)/val/instances.json \
		--storage-path $(OTHER_RUNS) --name pretrain
	$(OFFLINE) $(PY) jobs/benchmark.py --suite quality --train-annotations $(OTHER_DATA)/train/instances.json \
		--val-annotations $(OTHER_DATA)/val/instances.json --hypernet-steps 1500 --oracle-tasks 4 --oracle-steps 750 \
		--sam-checkpoint $$($(VENV)/bin/talora checkpoint $(OTHER_RUNS)/pretrain --file sam.safetensors) \
		--out $(BENCH_OUT)/quality-other

# The shipped demo models from scratch, on this 2-core CPU (never part of `make test`): demo data ->
# pretrain the vit_tiny base -> train the hypernet on it -> the report (docs/results.md) -> install
# both, fp16, into talora/assets/demo/ (only once everything before succeeded).
MODELS_DATA ?= data/demo-models
MODELS_PRETRAIN_DATA ?= data/demo-models-pretrain-24k
MODELS_RUNS ?= runs/demo-models
demo-models: setup
	rm -rf $(MODELS_RUNS)/pretrain $(MODELS_RUNS)/hypernet
	test -f $(MODELS_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data --out $(MODELS_DATA) \
		--num-images 3000 --num-val 100 --seed 0
	test -f $(MODELS_PRETRAIN_DATA)/val/instances.json || $(OFFLINE) $(VENV)/bin/talora demo-data \
		--out $(MODELS_PRETRAIN_DATA) --num-images 24000 --num-val 100 --seed 0
	$(OFFLINE) $(PY) jobs/train_hypernet.py --config configs/demo_pretrain.yaml
	$(VENV)/bin/talora fp16 $$($(VENV)/bin/talora checkpoint $(MODELS_RUNS)/pretrain --file sam.safetensors) \
		$(MODELS_RUNS)/sam_vit_tiny.safetensors
	$(OFFLINE) $(PY) jobs/train_hypernet.py --config configs/demo_cpu.yaml \
		--sam-checkpoint $(MODELS_RUNS)/sam_vit_tiny.safetensors
	$(VENV)/bin/talora fp16 $$($(VENV)/bin/talora checkpoint $(MODELS_RUNS)/hypernet --file hypernet.safetensors) \
		$(MODELS_RUNS)/hypernet.safetensors --sam-checkpoint demo://sam_vit_tiny.safetensors
	$(OFFLINE) $(PY) jobs/report_demo_models.py --hypernet $(MODELS_RUNS)/hypernet.safetensors \
		--sam-checkpoint $(MODELS_RUNS)/sam_vit_tiny.safetensors --train-annotations $(MODELS_DATA)/train/instances.json \
		--val-annotations $(MODELS_DATA)/val/instances.json --out $(MODELS_RUNS)/report
	cp $(MODELS_RUNS)/sam_vit_tiny.safetensors $(MODELS_RUNS)/hypernet.safetensors talora/assets/demo/

# Per-task static LoRAs at the hypernet's step budget (a category, a supercategory, a colour, a
# colour x category) on the installed base, then the report with them beside the hypernet.
STATIC_TASKS ?= category:circle supercategory:vehicle color:red color:yellow+category:car
demo-compare: setup
	rm -rf $(MODELS_RUNS)/static-* $(MODELS_RUNS)/report-compare  # a same-named run would resume, on the old base
	for task in $(STATIC_TASKS); do \
		$(OFFLINE) $(PY) jobs/train_hypernet.py --config configs/demo_cpu.yaml --mode static --task $$task \
			--name static-$$(echo $$task | tr ':+' '__') || exit 1; \
	done
	$(OFFLINE) $(PY) jobs/report_demo_models.py --hypernet demo://hypernet.safetensors \
		--train-annotations $(MODELS_DATA)/train/instances.json --val-annotations $(MODELS_DATA)/val/instances.json \
		$(foreach t,$(STATIC_TASKS),--static-run $(MODELS_RUNS)/static-$(subst +,_,$(subst :,_,$(t)))) \
		--out $(MODELS_RUNS)/report-compare

# The GPU check (docs/gpu-check.md). `make gpu-carry` here (PyPI, after setup) builds .gpu-carry/, the
# wheels a bare device lacks; `make gpu-check` there installs them and runs every GPU section (no venv:
# the device's own python3 and CUDA torch); `make gpu-check DRY=1` is the same script on this CPU.
GPU_OUT ?= $(if $(OUT),$(OUT),runs/gpu-check)
gpu-carry: setup
	$(OFFLINE) $(PY) jobs/gpu_check.py carry --out .gpu-carry

ifdef DRY
gpu-check: setup
	$(OFFLINE) $(PY) jobs/gpu_check.py run --dry-run --out $(GPU_OUT)
else
gpu-check:
	$(OFFLINE) python3 jobs/gpu_check.py run --out $(GPU_OUT)
endif

clean:
	rm -rf runs .pytest_cache
