# Two commands for a fresh machine: `make demo` and `make test`. Both install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
FERRY  := $(VENV)/bin/ferry
PYTEST_ARGS ?=

.PHONY: demo test unit e2e bench setup system image clean lab-down

demo: setup
	$(PY) -m ferry.lab.demo

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -ra -m "not e2e" $(PYTEST_ARGS)

e2e: setup
	$(PY) -m pytest -ra -m e2e $(PYTEST_ARGS)

setup: system $(VENV)/.installed image

system:
	bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

image: $(VENV)/.installed
	$(FERRY) image build

lab-down:
	-$(FERRY) lab down

clean: lab-down
	rm -rf $(VENV) .cache
