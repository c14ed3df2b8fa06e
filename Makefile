# The two commands a newcomer runs (see README): `make demo` and `make test`.
# Both create/update the local virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ASSETS ?= $(if $(ZSQ_ASSETS),$(ZSQ_ASSETS),../shared/assets)
DEMO_OUT ?= runs/demo

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

.PHONY: install demo test test-slow
install: $(VENV)/.installed

# Quantize the shared CIFAR-10 ResNet-20 to W4A4 with no data (Genie-D synthesis + Genie-M
# reconstruction, quick budget) and print FP32 vs quantized top-1 and the time taken.
demo: $(VENV)/.installed
	$(VENV)/bin/zsq quantize cifar10_resnet20 --weights $(ASSETS)/cifar10/resnet20-12fca82f.th \
	  --method genie --bits w4a4 --budget quick --out $(DEMO_OUT) --force \
	  --eval-data $(ASSETS)/cifar10/cifar10_test_lossless_first1017.npz

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow
