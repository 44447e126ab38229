# matchmap: the two commands are `make demo` and `make test`; both set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
export MATCHMAP_TEST_PG_URL ?= postgresql+psycopg2://matchmap:matchmap@127.0.0.1:5432/matchmap_test

.PHONY: demo test lint system install protos bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's declared dependencies change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

system:
	bash .ci/system-setup.sh

install: system $(STAMP)

test: install
	$(PY) -m pytest -q -ra

demo: install
	bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf .demo .pytest_cache
