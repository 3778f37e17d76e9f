# Fresh machine: `make up` serves the demo model, `make test` runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: install protos up test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[test,ucx]' || $(PIP) -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) protos

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

up: install
	$(BIN)/stagemesh up --port $(PORT)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) stagekit/rpc/pb/*_pb2*.py stagekit/rpc/pb/*_pb2.pyi

# The docker compose cluster, checked for real (engine via ../shared/tools/setup-docker.sh when
# present; build, up, greedy text vs a local `stagemesh up`, a stage stopped, down -v). ~3 min.
.PHONY: compose-smoke
compose-smoke: install
	PYTHON=$(BIN)/python bash scripts/compose-smoke
