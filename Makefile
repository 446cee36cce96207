# Two commands do all the set-up: `make run` and `make test` create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so that pip takes the CPU 2.13.0 file and never a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test test-all install clean-venv constraints

# constraints.txt pins every other package to the versions the README's numbers were measured with.
$(BIN)/zeda: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt "$(TORCH)" -e ".[test]"
	touch $(BIN)/zeda

install: $(BIN)/zeda

# The hard built-in suite, where skipping costs accuracy and ZEDA has to earn it back (README, "ZEDA over three
# training seeds"); measured from an empty cache: 14m47s with its teacher build. The basic suite, about 7 minutes:
# $(BIN)/python -m launch.train --config launch/configs/tiny-cpu.yaml
run: install
	$(BIN)/python -m launch.train --config launch/configs/tiny-cpu-hard.yaml

# ruff first (pyproject's [tool.ruff]: lint and format, line length 120): seconds, before the suite.
# The slowest end-to-end runs (marked `slow`: a killed driver resumed, `ray job submit` and `ray job stop`
# against a local head, a chat-templated run resumed, four rollout and two teacher engines, synchronous OPD from a
# JSONL, a killed learner rank, killed engines with 10,000 malformed messages, a killed rollouts job resumed, the
# learner demo command, the TP broadcast order, the final weights after engine restarts) take about 11.5 of its
# minutes: CI (CI set) and `make test-all` run them, a developer's `make test` leaves them out to stay under 15.
PYTEST_SELECT ?= $(if $(CI),,-m "not slow")
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --durations=25 $(PYTEST_SELECT)

test-all:
	$(MAKE) test PYTEST_SELECT=

clean-venv:
	rm -rf $(VENV)

# After a dependency change in pyproject.toml: rebuild .venv without the old pins, then record the new ones.
constraints:
	rm -rf $(VENV) && $(PY) -m venv $(VENV) && $(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	{ head -3 constraints.txt; $(BIN)/python -m pip freeze | grep -v "^-e\|^zeda\|^torch=="; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(BIN)/zeda

# The paper's comparison on the embedded default (runs/tiny-cpu-baselines: table, plots, where tokens skip),
# then the serving speed of the teacher, ZEDA and NET in one engine, then the comparison on the hard suite with its
# lean teacher (runs/tiny-cpu-hard-lean-baselines, three training seeds with one teacher and paired intervals; its
# teacher build adds about 17 minutes, the three seeds about 25; README, "A teacher with room").
# OMP_WAIT_POLICY=PASSIVE: on a shared CPU, OpenMP's default busy-wait made a 2-thread teacher step
# 26x slower (measured, 14.3 s vs 0.54 s).
.PHONY: paper
paper: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/zeda baselines --config launch/configs/tiny-cpu.yaml
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/decode.py --baselines runs/tiny-cpu-baselines
	OMP_WAIT_POLICY=PASSIVE $(BIN)/zeda baselines --config launch/configs/tiny-cpu-hard-lean.yaml --seeds 0,1,2
