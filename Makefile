# make test   install what is missing, build the extension, run the whole test suite
# make bench  install what is missing, build the extension, run python -m fused_resnet.bench
#
# An importable torch (a CUDA build, say) is used as it is; only when none is importable is the
# CPU wheel torch==2.13.0 installed. Packages already importable are not reinstalled.

PYTHON ?= python
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test bench nvcc-check clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@for pkg in setuptools:setuptools wheel:wheel ninja:ninja numpy:numpy triton:triton pytest:pytest \
	            pytest_benchmark:pytest-benchmark hypothesis:hypothesis \
	            sklearn:scikit-learn tqdm:tqdm; do \
	    mod=$${pkg%%:*}; dist=$${pkg##*:}; \
	    $(PYTHON) -c "import $$mod" 2>/dev/null || $(PIP) install "$$dist" || exit 1; \
	done
	$(PIP) install --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m fused_resnet.bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fused_resnet/_C*.so
