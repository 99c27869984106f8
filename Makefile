# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the project with the pinned versions
# in requirements.lock (pip constraints), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recap-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test install lock clean-runs

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The embedded default (the toy experiment, CPU, ~13 minutes on 2 cores): synthetic-scenes shards,
# then stage 1 of the recipe: pretrain the captioner, fine-tune SSC and DSC, score their captions;
# then stage 2: recaption the training shards with both captioners, and fit the toy T5 tokenizer.
# Each stage prints a summary; rerunning resumes or finds the work done. (Later stages join the
# demo as they land; see docs/pipeline.md.)
demo: $(STAMP)
	$(BIN)/recap make-toy-data $(DEMO_ARGS)
	$(BIN)/recap pretrain-captioner $(DEMO_ARGS)
	$(BIN)/recap finetune-captioner style=ssc $(DEMO_ARGS)
	$(BIN)/recap finetune-captioner style=dsc $(DEMO_ARGS)
	$(BIN)/recap evaluate-captioner $(DEMO_ARGS)
	$(BIN)/recap recaption $(DEMO_ARGS)
	$(BIN)/recap train-tokenizer $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Refresh requirements.lock from the current environment (after changing dependencies).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^recap-diffusion' > requirements.lock

clean-runs:
	rm -rf runs
