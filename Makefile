# iommu-lab: every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test guests linux-guest bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements.txt vmm/walker/walker.c vmm/walker/build.py vmm/backends/kvm_build.py vmm/backends/emu_build.py vmm/backends/frames_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	rm -f vmm/walker/_walker*.so vmm/backends/_kvm*.so vmm/backends/_emu*.so vmm/backends/_frames*.so   # the editable install compiles these in place; no stale copy may shadow them
	$(BIN)/python -m pip install -q --no-build-isolation -e . --config-settings editable_mode=compat
	touch $@

guests:
	$(MAKE) -s -C guest_images

# A Debian cloud kernel and a busybox initramfs (apt-get download), for `vmm run` of a real Linux.
linux-guest:
	$(MAKE) -s -C guest_images/linux PYTHON=$(PYTHON)

demo: setup guests
	$(BIN)/vmm run

test: setup guests
	$(BIN)/python -m pytest -q $(if $(filter-out 1,$(shell nproc)),-n auto)

bench: setup guests
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check .

clean:
	$(MAKE) -s -C guest_images clean
	$(MAKE) -s -C guest_images/linux clean
	rm -rf build *.egg-info vmm/walker/_walker*.so vmm/walker/_walker.c vmm/backends/_kvm*.so vmm/backends/_kvm.c vmm/backends/_emu*.so vmm/backends/_emu.c vmm/backends/_frames*.so vmm/backends/_frames.c .pytest_cache
