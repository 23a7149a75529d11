# Every target creates .venv from pyproject.toml when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MAXTEXT_VENV := .venv-maxtext
MAXTEXT_STAMP := $(MAXTEXT_VENV)/.installed

.PHONY: demo test test-faults test-maxtext lint bench clean venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[jax,gcs,s3,merge,wandb,tensorboard,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-faults: $(STAMP)
	$(PY) -m pytest -q -m slow

# The real MaxText trainer (maxtext[tpu] needs Python 3.12) against the real daemon; not part of
# `make test`. The first run builds .venv-maxtext (several GB, a few minutes).
$(MAXTEXT_STAMP):
	@py=$$(for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	    "$$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo "$$c" && break; \
	  done); \
	test -n "$$py" || { echo "make test-maxtext needs Python 3.12 (python3.12 on PATH)" >&2; exit 2; }; \
	test -x $(MAXTEXT_VENV)/bin/python || "$$py" -m venv $(MAXTEXT_VENV)
	$(MAXTEXT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MAXTEXT_VENV)/bin/python -m pip install --quiet "maxtext[tpu]==0.2.5"
	touch $(MAXTEXT_STAMP)

test-maxtext: $(STAMP) $(MAXTEXT_STAMP)
	$(PY) tests/maxtext_e2e.py --maxtext-python $(MAXTEXT_VENV)/bin/python --durable file
	$(PY) tests/maxtext_e2e.py --maxtext-python $(MAXTEXT_VENV)/bin/python --durable gs

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(MAXTEXT_VENV) build *.egg-info .pytest_cache
