# edgec: two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench setup system-deps clean emulator

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages: Fashion-MNIST data, the aarch64 cross linker, clang + lld (Android), qemu-user. Best effort where not root.
system-deps:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && command -v aarch64-linux-gnu-gcc >/dev/null && command -v aarch64-linux-gnu-objdump >/dev/null && command -v clang >/dev/null && command -v ld.lld >/dev/null && command -v qemu-aarch64 >/dev/null; then \
	  echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user clang lld >/dev/null; \
	else \
	  echo "warning: run 'sudo apt-get install dataset-fashion-mnist gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user clang lld' for real data and ARM builds"; \
	fi

demo: $(STAMP)
	$(BIN)/edgec demo

# The emulated aarch64 device the device tests run on (once: ~45 s, ~150 MB of downloads; into
# $EDGEC_EMULATOR_DIR when set, else ~/.cache/edgec/emulator).
emulator: $(STAMP)
	$(BIN)/edgec device emulate --profile rpi5 --provision-only

test: $(STAMP)
	$(BIN)/python -m pytest

# ruff (rule set in pyproject.toml), the import-layer contract, and mypy on the typed core layers.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Every benchmark in benchmarks/ (tens of minutes; see benchmarks/run.py), then BENCHMARKS.md.
bench: $(STAMP)
	nice $(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) *.egg-info
