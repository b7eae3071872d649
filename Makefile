# The two README commands: `make run` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.recon-installed

.PHONY: install run test check lint clean

$(STAMP): pyproject.toml setup.py build_cuda.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PIP) install -q --disable-pip-version-check setuptools wheel "pybind11>=2.10" ninja
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e ".[test,models,bench]"
	touch $(STAMP)

install: $(STAMP)

# The main job: environment report, every op x backend vs the eager reference, then the
# model-layer job when present.
run: install
	$(PY) -m python_models info
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		interp=0; else interp=1; fi; \
	TRITON_INTERPRET=$$interp $(PY) -m recon_kernels check
	$(PY) -m python_models compare --quick --out runs/compare

# CPU: Triton kernels run in the interpreter. pytest exit 5 (no tests collected) is a failure.
test: install
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		interp=0; else interp=1; fi; \
	TRITON_INTERPRET=$$interp $(PY) -m pytest -q -n 2 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as failure"; exit 1; fi; \
	exit $$rc

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info recon_kernels/_cuda*.so
