# Two commands do all set-up on a fresh machine: `make demo` (main job, offline, SQLite) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,napari
LS_VENV := .ls-venv

.PHONY: demo test test-deps lint bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the build that pip takes from local disk (other versions download GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/surgenet-assist demo --out demo-output

# The suite also needs a virtual X server (napari tests) and a real Label Studio in its own venv
# (integration tests); both steps are idempotent and skip when already done.
test-deps: $(STAMP)
	bash scripts/install_system_deps.sh
	bash scripts/setup_label_studio.sh $(LS_VENV)

test: test-deps
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/predictor.py

clean:
	rm -rf $(VENV) $(LS_VENV) demo-output build dist *.egg-info
