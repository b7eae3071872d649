# The two README commands: `make run` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.recon-installed
# triton 3.6 (the GPU image's version) beside the installed one, for the static SASS tests
TRITON36 := .venv-triton36
TRITON36_STAMP := $(TRITON36)/.recon-ok

.PHONY: install run test check lint clean

$(STAMP): pyproject.toml setup.py build_cuda.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PIP) install -q --disable-pip-version-check setuptools wheel "pybind11>=2.10" ninja
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e ".[test,models,bench]"
	touch $(STAMP)

install: $(STAMP)

# best effort: without it (no PyPI), the triton-3.6 static tests skip and say why
$(TRITON36_STAMP):
	@($(PYTHON) -m venv $(TRITON36) && \
	  $(TRITON36)/bin/python -m pip install -q --disable-pip-version-check \
	    "torch==$(TORCH_VERSION)" triton==3.6.0 && touch $(TRITON36_STAMP)) \
	  || echo "triton 3.6 venv not made: the static tests under triton 3.6 will skip"

# The main job: environment report, every op x backend vs the eager reference, then the
# model-layer job when present.
run: install
	$(PY) -m python_models info
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		interp=0; else interp=1; fi; \
	TRITON_INTERPRET=$$interp $(PY) -m recon_kernels check
	$(PY) -m python_models compare --quick --out runs/compare

# CPU: Triton kernels run in the interpreter. pytest exit 5 (no tests collected) is a failure.
test: install $(TRITON36_STAMP)
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		interp=0; else interp=1; fi; \
	if [ -f $(TRITON36_STAMP) ]; then export RECON_TRITON_VENV=$(abspath $(TRITON36)); fi; \
	TRITON_INTERPRET=$$interp $(PY) -m pytest -q -n 2 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as failure"; exit 1; fi; \
	exit $$rc

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(TRITON36) build *.egg-info recon_kernels/_cuda*.so
