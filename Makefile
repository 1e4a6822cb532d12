# lfme_fast: one-command setup, tests, demo and dataset preparation.
# `make demo` and `make test` work on a fresh machine: both depend on `setup`.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
NPROC := $(shell nproc 2>/dev/null || echo 2)

# Where datasets live; override on the command line, e.g. `make prep-imagenet-lt IMAGENET_ROOT=/data/imagenet`.
DATA ?= data
# The public split lists ship in data_prep/splits (data_prep/splits/SOURCES.md). The ImageNet-LT and
# iNaturalist-2018 training lists are not among them: give yours with IMAGENET_TRAIN_LIST / INAT_TRAIN_LIST
# (or point IMAGENET_LISTS / INAT_LISTS at a folder holding every list).
SPLITS ?= data_prep/splits
IMAGENET_ROOT ?= /datasets/imagenet
IMAGENET_LISTS ?= $(SPLITS)/ImageNet_LT
IMAGENET_TRAIN_LIST ?=
PLACES_ROOT ?= /datasets/places365
PLACES_LISTS ?= $(SPLITS)/Places_LT
INAT_ROOT ?= /datasets/inat2018
INAT_LISTS ?= $(SPLITS)/iNaturalist18
INAT_TRAIN_LIST ?=
CIFAR10_ROOT ?= /datasets/cifar-10-batches-py
CIFAR100_ROOT ?= /datasets/cifar-100-python
FMNIST_ROOT ?= $(firstword $(wildcard /usr/share/datasets/fashion-mnist) ../shared/data/fashion-mnist)
IR ?= 100
SCALE ?= 0.02
PREP_ARGS ?=

.PHONY: setup test demo clean-venv prep-imagenet-lt prep-places-lt prep-inat18 prep-cifar10-lt \
        prep-cifar100-lt prep-fmnist-lt prep-synthetic-lt compare-fmnist-lt bench-prep bench bench-gpu bench-sampler-memory bench-report

setup: $(STAMP)

# Idempotent: apt only when a package is missing (and we are root), pip only when
# pyproject.toml or constraints.txt changed since the last install. The extras keep the whole suite
# running: [test] (pytest, tensorboard for the tracker test), [dali-cuda13] (the DALI CPU pipeline tests).
$(STAMP): pyproject.toml constraints.txt
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "[setup] apt-get install $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "[setup] warning: missing apt packages ($$missing) and not root; install them yourself"; fi; \
	fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dali-cuda13]"
	@touch $@

test: setup
	$(PY) -m pytest -q -x --durations=15

demo: setup
	$(PY) -m lfme_fast.demo --data $(DATA) --fmnist-root $(FMNIST_ROOT)

clean-venv:
	rm -rf $(VENV)

prep-imagenet-lt: setup
	$(PY) -m data_prep imagenet-lt --root $(IMAGENET_ROOT) --lists $(IMAGENET_LISTS) \
	  $(if $(IMAGENET_TRAIN_LIST),--train $(IMAGENET_TRAIN_LIST)) --out $(DATA)/imagenet_lt $(PREP_ARGS)

prep-places-lt: setup
	$(PY) -m data_prep places-lt --root $(PLACES_ROOT) --lists $(PLACES_LISTS) --out $(DATA)/places_lt $(PREP_ARGS)

prep-inat18: setup
	$(PY) -m data_prep inat18 --root $(INAT_ROOT) --lists $(INAT_LISTS) \
	  $(if $(INAT_TRAIN_LIST),--train $(INAT_TRAIN_LIST)) --out $(DATA)/inat18 $(PREP_ARGS)

prep-cifar10-lt: setup
	$(PY) -m data_prep cifar10-lt --root $(CIFAR10_ROOT) --imbalance-ratio $(IR) --out $(DATA)/cifar10_lt_ir$(IR) $(PREP_ARGS)

prep-cifar100-lt: setup
	$(PY) -m data_prep cifar100-lt --root $(CIFAR100_ROOT) --imbalance-ratio $(IR) --out $(DATA)/cifar100_lt_ir$(IR) $(PREP_ARGS)

prep-fmnist-lt: setup
	$(PY) -m data_prep fmnist-lt --root $(FMNIST_ROOT) --imbalance-ratio $(IR) --out $(DATA)/fmnist_lt_ir$(IR) $(PREP_ARGS)

# The issue-12 comparison on Fashion-MNIST-LT: every method under one protocol, 3 seeds, plus the
# permuted class order (CLASS_ORDER) table; resumable (a re-run skips finished runs). Writes
# results/fmnist_lt_comparison.{json,md,png} (+ _curves.png) with the second table appended.
CLASS_ORDER ?= 1
compare-fmnist-lt: setup
	@test -f $(DATA)/fmnist_lt_ir100/manifest.json || $(PY) -m data_prep fmnist-lt --root $(FMNIST_ROOT) \
	  --imbalance-ratio 100 --out $(DATA)/fmnist_lt_ir100
	@test -f $(DATA)/fmnist_lt_ir100_order$(CLASS_ORDER)/manifest.json || $(PY) -m data_prep fmnist-lt \
	  --root $(FMNIST_ROOT) --imbalance-ratio 100 --class-order $(CLASS_ORDER) --out $(DATA)/fmnist_lt_ir100_order$(CLASS_ORDER)
	$(PY) -m lfme_fast.compare --preset fmnist_lt_order --data $(DATA)/fmnist_lt_ir100_order$(CLASS_ORDER) \
	  --out runs/compare_fmnist_lt_order$(CLASS_ORDER) --report-dir results --name fmnist_lt_order$(CLASS_ORDER)_comparison \
	  --title "Fashion-MNIST-LT (IR 100), class order permuted with seed $(CLASS_ORDER)"
	$(PY) -m lfme_fast.compare --preset fmnist_lt --data $(DATA)/fmnist_lt_ir100 --out runs/compare_fmnist_lt \
	  --report-dir results --name fmnist_lt_comparison --title "Fashion-MNIST-LT (IR 100): every method under one protocol" \
	  --also results/fmnist_lt_order$(CLASS_ORDER)_comparison.json

prep-synthetic-lt: setup
	$(PY) -m data_prep synthetic-lt --scale $(SCALE) --out $(DATA)/synthetic_lt $(PREP_ARGS)

bench-prep: setup
	$(PY) -m data_prep.bench --scale $(SCALE) --json-out results/bench_prep.json

# `make bench`: every CPU benchmark, each writing its results/bench_*.json (machine and versions inside),
# then results/BENCHMARKS.md with its plots. About 20-25 minutes on a quiet 2-core machine; run it
# on a machine with nothing else running (wall-clock figures move with other load). BENCH_SCALE sizes
# the synthetic ImageNet-LT-shaped set (0.05: 5,847 images, prepared once into ~/.cache/lfme_fast).
BENCH_SCALE ?= 0.05
BENCH_LOADERS ?= ffcv,dali,torch,torch_fullsize,ffcv_uint8,ffcv_stock,ffcv_2views,dali_2views,torch_2views
# Rounds of the step benchmark (its default is 15): 10 keeps `make bench` within 25 minutes with the ECL and
# CBD rows (one round of all seven kinds: an estimated ~15 s on a quiet 2-core machine).
BENCH_STEP_REPEATS ?= 10

bench: setup
	$(PY) -m data_prep.bench --scale $(BENCH_SCALE) --json-out results/bench_prep.json
	$(PY) -m lfme_fast.bench sampler --json-out results/bench_sampler.json
	$(PY) -m lfme_fast.bench loader --scale $(BENCH_SCALE) --backends $(BENCH_LOADERS) --json-out results/bench_loader.json
	$(PY) -m lfme_fast.bench train --devices cpu --json-out results/bench_train.json
	$(PY) -m lfme_fast.bench step --device cpu --repeats $(BENCH_STEP_REPEATS) --json-out results/bench_step.json
	$(PY) -m lfme_fast.bench epoch --scale $(BENCH_SCALE) --json-out results/bench_epoch.json
	$(PY) -m lfme_fast.bench memory --scale $(BENCH_SCALE) --json-out results/bench_memory.json
	$(PY) -m lfme_fast.bench compile --device cpu --threads 1 --json-out results/bench_compile_cpu.json
	$(PY) -m lfme_fast.bench report

# `make bench-gpu`: the GPU path in one script (within 8 minutes on one H100/H200-class GPU), then the
# page. Without CUDA it runs its tiny CPU fallback, which says so and measures nothing about a GPU.
bench-gpu: setup
	$(PY) -m lfme_fast.bench gpu --json-out results/bench_gpu.json
	$(PY) -m lfme_fast.bench report

# `make bench-sampler-memory`: one process's epoch plan at 1e8 and 1e9 samples per epoch (about 3 minutes
# and 12 GiB at its peak; not part of `make bench`), results/bench_sampler_memory.json.
bench-sampler-memory: setup
	$(PY) -m lfme_fast.bench sampler_memory --json-out results/bench_sampler_memory.json

# The page alone, from the JSONs already in results/.
bench-report: setup
	$(PY) -m lfme_fast.bench report
