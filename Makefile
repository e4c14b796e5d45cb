# Quickstart: `make demo` and `make test`; each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup redis kernels lint proto clean

setup: $(STAMP)

# The CPU torch wheel is pinned first so no dependency pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v ninja >/dev/null || { \
	  echo "installing ninja-build (apt-get; builds the optional C++ CPU kernels)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ninja-build >/dev/null \
	  || echo "ninja-build not installed: the C++ CPU kernels stay off (torch path)"; }

# The C++ CPU kernels (kernels/cpu_kernels.py) build once per machine, cached;
# building here keeps the ~15 s out of the first engine's start.
kernels: $(STAMP) redis
	@$(PY) -c "from kernels import cpu_kernels as k; print('C++ CPU kernels:', \
	  'ready' if k.load() else 'unavailable, engines use torch')"

demo: $(STAMP) redis kernels
	$(VENV)/bin/baton demo

test: $(STAMP) redis kernels
	$(PY) -m pytest -q

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache benchmarks/out
