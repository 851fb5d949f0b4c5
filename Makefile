# The two commands of the README: `make run` (the main job: DTG-Net's table 3) and `make test`.
# Each creates .venv and installs the project into it first, when pyproject.toml is newer than
# the last install. `make all` builds every table.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run all test lint dvc-repro

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,slurm]'
	touch $@

run: $(BIN)/.installed
	snakemake --cores all results/tables/table3.csv

all: $(BIN)/.installed
	snakemake --cores all all

test: $(BIN)/.installed
	ruff check pipeline tests
	ruff format --check pipeline tests
	python -m pipeline dvc-yaml --check
	pytest -q

dvc-repro: $(BIN)/.installed
	dvc repro
