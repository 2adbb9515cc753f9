# The README's two commands: `make train` and `make test`. Each sets up .venv once (pip, ~2 min).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test test-fast lint wheel figures bench-samplers bench-gpu clean-logs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,slurm,optuna,latent]"
	touch $@

train: $(VENV)/.installed  ## the main job on the embedded default data (2-D mixture, MLP, 1.5–4.5 min on 2 cores)
	$(PY) -m diffusionflow.train

test test-fast: export WANDB_MODE = offline
test: $(VENV)/.installed  ## the whole suite, slow tests included (what CI runs)
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# A wheel with the configs inside (diffusionflow/conf): `pip install dist/diffusionflow-*.whl`, then
# df-train / df-sample / df-evaluate / df-compare from any folder, logs under that folder.
wheel: $(VENV)/.installed
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --no-index . -w dist && rm -rf build

figures: $(VENV)/.installed
	$(PY) scripts/blog_figures.py --out logs/figures

bench-samplers: $(VENV)/.installed
	$(PY) scripts/bench_samplers.py --out logs/bench

bench-gpu: $(VENV)/.installed  ## one CUDA GPU, a few minutes: training, host syncs, sampling, FID features
	$(PY) scripts/bench_gpu.py --out logs/bench

clean-logs:
	rm -rf logs/*/ && touch logs/.gitkeep
