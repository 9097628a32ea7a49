# celldiff: two commands for a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHIPPED := weights/celldiff64.safetensors

.PHONY: demo test test-slow test-all lint bench clean-demo install-app

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## install-app: the app extra (celldiff app, Gradio) and Selenium for its browser test (Chromium: .ci/run)
install-app: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,app]' 'selenium>=4.20'

## demo: install, train configs/demo.yaml on the bundled sample, write sample images
demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/celldiff fit --config configs/demo.yaml --run_dir runs/demo/latest-$$(date +%Y%m%d-%H%M%S) && \
	RUN=$$(ls -td runs/demo/latest-* | head -1) && \
	$(BIN)/celldiff predict --config configs/demo.yaml --ckpt_path $$RUN/checkpoints/last.ckpt \
		--output_dir $$RUN/demo_samples --num_samples 64 --seed 0 && \
	echo "" && echo "celldiff demo: samples in $$RUN/demo_samples (grid: $$RUN/demo_samples/grid.png)," && \
	echo "               training grids in $$RUN/samples, metrics in $$RUN/metrics.csv" && \
	CELLDIFF=$(BIN)/celldiff SHIPPED=$(SHIPPED) bash scripts/demo_shipped.sh $$RUN

## test: the fast test suite (what CI runs first)
test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

## test-slow: the slow tests (notebooks, multi-process DDP)
test-slow: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_sampling.py
