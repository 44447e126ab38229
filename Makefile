# matchmap: the two commands are `make demo` and `make test`; both set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
export MATCHMAP_TEST_PG_URL ?= postgresql+psycopg2://matchmap:matchmap@127.0.0.1:5432/matchmap_test

.PHONY: demo test lint system install protos bench clean gpu-wheels

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

# Wheels (Python 3.12, x86-64) of the packages a lent GPU machine's image lacks, for bench/gpu_session.sh.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    faiss-cpu==1.15.1 SQLAlchemy==2.1.9 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 grpcio==1.85.3 \
	    grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 grpcio-status==1.85.3 \
	    googleapis-common-protos==1.76.0 silero-vad==6.2.3

clean:
	rm -rf .demo .pytest_cache
