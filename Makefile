# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the project with the pinned versions
# in requirements.lock (pip constraints), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recap-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo sweep test install lock clean-runs

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The embedded default (the toy experiment, CPU, under 15 minutes on 2 cores): `recap pipeline`
# runs every stage of the recipe in order (synthetic-scenes shards -> captioner pretrain -> SSC
# and DSC fine-tunes -> recaption -> toy VAE -> cache -> train-t2i -> sample -> evaluate) and
# writes runs/toy/report.md. A rerun skips complete stages and continues an interrupted one.
demo: $(STAMP)
	$(BIN)/recap pipeline $(DEMO_ARGS)

# The caption-mix sweep of the paper's Figure 4 on the toy world (after the demo: the shared
# stages are reused, train-t2i/sample/evaluate run once per point), then its table and plot:
# alt-text only, an intermediate mix, the recipe's 0.95 and DSC only, each trained with two
# seeds (the table's ranges and the plot's error bars).
SWEEP_DSC ?= 0.0,0.65,0.95,1.0
SWEEP_SEEDS ?= 0,1
sweep: $(STAMP)
	$(BIN)/recap pipeline -m caption_mix.dsc=$(SWEEP_DSC) train_t2i.seed=$(SWEEP_SEEDS) $(DEMO_ARGS)
	$(BIN)/recap sweep-report $(DEMO_ARGS)

# Two workers (pytest-xdist; a file's tests stay together, so module fixtures are built once):
# most tests wait on `recap` subprocesses starting up, which one core alone leaves idle.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Refresh requirements.lock from the current environment (after changing dependencies).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^recap-diffusion' > requirements.lock

clean-runs:
	rm -rf runs
