# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# lava-nc 0.10 declares Python < 3.11 and lava-dl 0.6 pins torch < 2.4, norse
# 1.1 declares torchvision: they are installed with the flags that make them
# work here (see README, "Set-up details"); everything else resolves normally.
$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1 "numpy<2"
	$(PIP) --ignore-requires-python lava-nc==0.10.0
	$(PIP) --ignore-requires-python --no-deps lava-dl==0.6.0 norse==1.1.0
	$(PIP) h5py matplotlib "pillow<11" opencv-python-headless nir nirtorch \
	    tqdm rich scikit-learn hypothesis pytest ruff mypy setuptools ray
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/csqcfs-deploy demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	MYPY=$(CURDIR)/$(VENV)/bin/mypy .ci/typecheck

clean:
	rm -rf $(VENV) build *.egg-info
