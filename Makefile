# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install what they need, so they work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that a fresh machine takes the CPU build instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The library pins no Qt binding; the development environment uses PyQt6.
QT_SPEC ?= pyqt6
# What Qt's xcb platform needs under Xvfb (napari's viewer needs a real X server for OpenGL).
APT_PACKAGES := xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0 \
	libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxcb-cursor0 \
	libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3
PYTEST_ARGS ?=

# Where the wheel test builds and installs (outside the checkout, thrown away each time).
WHEEL_TEST_DIR ?= $(or $(TMPDIR),/tmp)/napari-dense-wheel-test

.PHONY: demo test test-wheel install system-deps lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's requirements change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[napari,test]" "$(QT_SPEC)"
	touch $@

# Xvfb and Qt's X libraries, from apt when missing (needs root; otherwise says what to install).
system-deps:
	@if ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing $(APT_PACKAGES)"; \
			apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
		else \
			echo "please install (as root): apt-get install -y $(APT_PACKAGES)"; exit 1; \
		fi; \
	fi

install: $(VENV)/.installed system-deps

# With a display: napari with the demo model running; without: outputs in demo_output/.
demo: install
	$(BIN)/python -m napari_dense.cli demo --output demo_output --overwrite

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-wheel

# The package as users install it: the wheel in a fresh venv outside the checkout (the pinned
# torch again), then the headless demo and npe2's manifest check run there.
test-wheel: install
	rm -rf "$(WHEEL_TEST_DIR)" && mkdir -p "$(WHEEL_TEST_DIR)"
	$(BIN)/python -m pip wheel --quiet --no-deps -w "$(WHEEL_TEST_DIR)/dist" .
	$(PYTHON) -m venv "$(WHEEL_TEST_DIR)/venv"
	"$(WHEEL_TEST_DIR)/venv/bin/python" -m pip install --quiet "$(TORCH_SPEC)" \
		"$(WHEEL_TEST_DIR)"/dist/napari_dense-*.whl npe2
	cd "$(WHEEL_TEST_DIR)" && ./venv/bin/napari-dense --version && \
		./venv/bin/napari-dense demo --headless --output demo && \
		test -f demo/demo_output.zarr/zarr.json && test -f demo/demo_overlay.png && \
		./venv/bin/npe2 validate napari-dense
	@echo "wheel test: passed"

lint: install
	$(BIN)/ruff check napari_dense tests benchmarks
	$(BIN)/ruff format --check napari_dense tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_modes.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis "$(WHEEL_TEST_DIR)"

# The GPU check's install step, rehearsed on this CPU machine (needs a package registry here, not
# on the GPU machine): fills $(DEVICE_WHEELS)/ with the wheels benchmarks/device_check.sh --wheels
# installs on a bare CUDA machine (CPython $(DEVICE_PYTHON), manylinux x86_64) and the project's
# wheel; then, in a fresh interpreter that sees torch and nothing else, installs the same
# packages for this Python with --no-index from a wheel folder and runs the check's --dry-run
# (all of it under $(DEVICE_REHEARSAL)/, so that $(DEVICE_WHEELS)/ holds only what the GPU needs).
DEVICE_WHEELS ?= device_wheels
DEVICE_REHEARSAL ?= .device_rehearsal
DEVICE_PYTHON ?= 3.12
rehearse-device: install
	@set -e; deps="$$(bash benchmarks/device_check.sh --print-deps)"; \
	local_tag=$$($(BIN)/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")'); \
	base=$$($(BIN)/python -c 'import sys; print(sys._base_executable)'); \
	rehearsal=$(DEVICE_REHEARSAL)/wheels-$$local_tag; \
	echo "wheels for the GPU machine (CPython $(DEVICE_PYTHON)) -> $(DEVICE_WHEELS)/"; \
	$(BIN)/python -m pip download --quiet --dest $(DEVICE_WHEELS) --only-binary=:all: \
		--python-version $(DEVICE_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 $$deps; \
	rm -f $(DEVICE_WHEELS)/napari_dense-*.whl; \
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(DEVICE_WHEELS) .; \
	echo "wheels for this machine's rehearsal ($$local_tag) -> $$rehearsal/"; \
	$(BIN)/python -m pip download --quiet --dest $$rehearsal --only-binary=:all: $$deps; \
	cp $(DEVICE_WHEELS)/napari_dense-*.whl $$rehearsal/; \
	torch_only=$(DEVICE_REHEARSAL)/torch-only-$$local_tag; rm -rf $$torch_only $$torch_only-venv; \
	$(BIN)/python benchmarks/torch_only.py $$torch_only >/dev/null; \
	$$base -m venv $$torch_only-venv; \
	start=$$(date +%s); \
	PYTHONPATH=$$PWD/$$torch_only PYTHONNOUSERSITE=1 bash benchmarks/device_check.sh --dry-run \
		--python $$torch_only-venv/bin/python --wheels $$rehearsal $(DEVICE_REHEARSAL)/out; \
	echo "rehearsal: $$(( $$(date +%s) - start )) s (summary: $(DEVICE_REHEARSAL)/out/summary.md);" \
		"$$(du -sh $(DEVICE_WHEELS) | cut -f1) of wheels for the GPU machine in $(DEVICE_WHEELS)/"
