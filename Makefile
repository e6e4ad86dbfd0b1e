# Two commands on a fresh machine with Python 3.11 and pip:
#   make run    -> installs, migrates, starts api + one worker on the embedded default (SQLite)
#   make test   -> installs, runs the test suite against the machine's PostgreSQL and Redis
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# Where datasets live; the real ECGs of this project sit beside the checkout.
export ECGSSL_DATA_ROOT ?= $(abspath ../shared/data)

.PHONY: install run test lint migrate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # CPU build here; Dockerfile.gpu installs the CUDA build of this pin
	$(PY) -m pip install -q -e '.[cpu,dev]'  # dev includes train (torch); a gateway alone: '.[cpu]'
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) -m alembic upgrade head

run: install
	$(PY) -m api --host $(HOST) --port $(PORT) --with-worker

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf var
