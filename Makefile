# tierfs: `make run` mounts a demo filesystem, `make test` runs lint and the whole test suite.
# Both install what is missing first (Debian packages as root, a .venv, the package).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv rsync attr acl
DEMO := demo

.PHONY: run test lint setup setup-test deb-packages bytecode clean demo-umount bench

deb-packages:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root to install:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "tierfs needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

# An editable install leaves compiling tierfs to its first imports, which write no bytecode
# where PYTHONDONTWRITEBYTECODE is set: every command would compile ~100 modules again
# (0.1-0.3 s). Compiling here is what `pip install .` does; up-to-date files are skipped.
bytecode: | $(BIN)/python
	$(BIN)/python -m compileall -q tierfs

setup: deb-packages $(VENV)/.installed bytecode

setup-test: deb-packages $(VENV)/.installed-test bytecode

run: setup
	@mkdir -p $(DEMO)/mnt
	@[ -f $(DEMO)/data/tierfs.toml ] || $(BIN)/tierfs mkfs $(DEMO)/data --site demo \
		--regional file://$(abspath $(DEMO))/region
	@if $(BIN)/python -m tierfs.datadir --is-mounted $(DEMO)/mnt; then \
		echo "already mounted at $(DEMO)/mnt"; \
	else \
		fusermount3 -u -z $(DEMO)/mnt 2>/dev/null || true; \
		$(BIN)/tierfs mount $(DEMO)/data $(DEMO)/mnt; \
	fi
	@echo
	@echo "tierfs is mounted at $(DEMO)/mnt (data directory $(DEMO)/data). Try:"
	@echo "  cp -r /etc $(DEMO)/mnt/ && ls $(DEMO)/mnt/etc"
	@echo "  $(BIN)/tierfs status $(DEMO)/mnt"
	@echo "  $(BIN)/tierfs snapshot create $(DEMO)/mnt && $(BIN)/tierfs sync $(DEMO)/mnt --wait"
	@echo "Unmount with:"
	@echo "  $(BIN)/tierfs umount $(DEMO)/mnt"

demo-umount:
	$(BIN)/tierfs umount $(DEMO)/mnt

lint: setup-test
	$(BIN)/ruff check tierfs tests tools
	$(BIN)/ruff format --check tierfs tests tools
	$(BIN)/mypy

test: setup-test lint
	$(BIN)/pytest -q --durations=25

bench: setup-test
	$(BIN)/python -m tools.bench.run

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
