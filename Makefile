# Two commands do all the set-up: `make run` and `make test` create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so that pip takes the CPU 2.13.0 file and never a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test install clean-venv

$(BIN)/zeda: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $(BIN)/zeda

install: $(BIN)/zeda

run: install
	$(BIN)/python -m launch.train --config launch/configs/tiny-cpu.yaml

test: install
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
