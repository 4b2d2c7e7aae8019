# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo's cache: empty means where every `pipe` command and the Python API look without --cache
# ($PIPE_CACHE, else ~/.cache/freeze-pipe), so the examples run after the demo find its data.
DEMO_CACHE ?=
DEMO_OUT ?= $(CURDIR)/demo-out
export HF_HUB_OFFLINE ?= 1
export NO_MKDOCS_2_WARNING ?= 1
## Bytecode is written where a module is first imported, and read from then on: where
## PYTHONDONTWRITEBYTECODE is set (as on the CI machines), each of the test suite's hundreds of
## processes would otherwise compile torch and the rest from source again.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install browser demo test test-fast docs bench gpu-check clean

## The environment, made again only when pyproject.toml changes. pip is upgraded first: the pip
## that comes with Python 3.11 (23.2) takes 84 s to resolve this project's dependencies against a
## large index, where a current one takes 34 s (the whole install: 156 s against 86 s). Where no
## index answers, the bundled pip is kept if it can install from pyproject.toml (pip >= 21.3).
## pip would byte-compile all 22,000 files it installs, one at a time; instead each module is
## compiled where it is first imported, and its bytecode kept (below), so only what runs is ever
## compiled.
$(BIN)/pipe: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip \
	  || $(BIN)/python -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'
	$(BIN)/pip install -q --no-compile -e '.[assets,xrv,openclip,dev,docs,release]'
	@touch $@

install: $(BIN)/pipe

## Headless Chromium (Debian's package) for the report's browser test: installed when missing,
## as root; elsewhere a note (the test then skips locally, and fails in CI, where CI=true).
CHROMIUM := $(firstword $(foreach c,chromium chromium-browser google-chrome,$(shell command -v $(c) 2>/dev/null)))
browser:
ifeq ($(CHROMIUM),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (Debian package) for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || { echo "error: apt-get could not install chromium" >&2; [ -z "$$CI" ] || exit 1; }; \
	elif [ -n "$$CI" ]; then \
	  echo "error: no chromium, and not root to install it: the browser test cannot run" >&2; exit 1; \
	else \
	  echo "note: no chromium here and not root: the browser test skips (as root: apt-get install chromium)"; \
	fi
endif

## The main job on the built-in demo data: embed once, train the Adaptor from the cache, evaluate.
demo: install
	$(BIN)/pipe demo --out $(DEMO_OUT) $(if $(DEMO_CACHE),--cache $(DEMO_CACHE))
	@echo "pipe and its Python are in $(VENV): run 'source $(VENV)/bin/activate' (or call $(BIN)/pipe) to use them."

## The test suite (what CI runs; the strict documentation build is one of its tests), in TEST_JOBS
## processes (pytest-xdist): many tests wait on subprocesses, servers and sleeps, so more processes
## than cores keep the cores busy. The tests
## of a module that builds its own module fixture share one process (tests/conftest.py).
## TEST_JOBS=0 runs the suite in one process.
TEST_JOBS ?= 4
## The project's own modules are byte-compiled first, and what most tests import is imported once
## (tests/helpers/warm.py), so that the suite's processes find it compiled.
PYTEST := $(BIN)/python -m compileall -qq -j 0 core cache pipeline stages cli bench tests \
	&& $(BIN)/python -m tests.helpers.warm && $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadgroup --no-loadscope-reorder
test: install browser
	$(PYTEST)

## The inner loop: everything but the tests marked slow (kills, subprocesses, clusters, compilation).
test-fast: install browser
	$(PYTEST) -m "not slow"

## The documentation site, built strictly (a broken link, anchor or missing page fails) and offline, into site/.
docs: install
	$(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python bench/embed_overhead.py

## On a GPU machine: the GPU tests and both GPU benchmarks (under 8 minutes), one JSON object
## on stdout and in gpu-check.json. Without CUDA it says that nothing was measured and exits 0.
## `make gpu-check GPU_PY=python3` runs it with an interpreter that already has the packages,
## installing nothing (its preflight names any that are missing); GPU_ARGS adds options,
## e.g. GPU_ARGS=--preflight (the few-second check alone) or GPU_ARGS=--strict.
GPU_PY ?=
GPU_ARGS ?=
ifeq ($(strip $(GPU_PY)),)
gpu-check: install
	$(BIN)/python bench/gpu_check.py --out gpu-check.json $(GPU_ARGS)
else
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu_check.py --out gpu-check.json $(GPU_ARGS)
endif

## Removes demo-out (and DEMO_CACHE when one was given); a demo in the shared cache stays there.
clean:
	rm -rf $(DEMO_OUT) $(DEMO_CACHE) site
