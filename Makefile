# projected-grpo recipes. `make setup` once, then `make test` / `make fast-dev-run`.
PY        ?= .venv/bin/python
PGRPO     ?= .venv/bin/pgrpo
TORCH_SPEC ?= torch==2.14.1
# FORCE_CUDA=1 compiles csrc/cuda/*.cu with nvcc even without a GPU (CI does this); 0 forces CPU-only.
FORCE_CUDA ?=
TORCH_CUDA_ARCH_LIST ?= 9.0
APT_PACKAGES = bubblewrap prometheus docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt venv install test test-fast bench bench-kernel bench-grader bench-step \
        fast-dev-run demo substrate smoke-vanilla smoke-projected extract download-model queue-full queue-cpu report report-cpu clean

setup: apt venv install

apt:
	@if command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    $(SUDO) apt-get update -q || true; \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	  fi; \
	else echo "apt-get not found: install $(APT_PACKAGES) by hand (optional: bwrap sandbox, prometheus tests)"; fi

venv:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt

install:
	FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2 \
	  $(PY) -m pip install -q -e . --no-build-isolation
	$(PY) -c "import pgrpo.ops as o; print('pgrpo installed; extension:', o.HAVE_EXTENSION)"

test:
	$(PY) -m pytest -q tests

bench: bench-kernel bench-grader bench-step

bench-kernel:
	$(PGRPO) bench kernel

bench-grader:
	$(PGRPO) bench grader

bench-step:
	$(PGRPO) bench step

fast-dev-run:
	$(PGRPO) train --config jobs/fast-dev-run.yaml --out runs/fast-dev-run --overwrite

# The CPU substrate (docs/experiments.md): texts + warm-started tiny Qwen3, each built only if its content stamp
# changed; then vanilla GRPO on it, printing per step the hack, pass and hacked-tests rates and the held-out probe.
substrate:
	$(PY) -m pgrpo.substrate ensure --out runs/substrate

demo: substrate
	$(PGRPO) train --config jobs/demo.yaml --out runs/demo --overwrite

smoke-vanilla:
	$(PGRPO) train --config jobs/smoke-vanilla.yaml --out runs/smoke-vanilla --overwrite

smoke-projected: extract
	$(PGRPO) train --config jobs/smoke-projected.yaml --out runs/smoke-projected --overwrite

extract:
	$(PGRPO) extract --config jobs/smoke-projected.yaml --out runs/vhack/vhack.safetensors

download-model:
	$(PY) -c "from huggingface_hub import snapshot_download; print(snapshot_download('Qwen/Qwen3-4B'))"

queue-full:
	$(PGRPO) sweep --config jobs/sweep-full.yaml

queue-cpu:
	$(PGRPO) sweep --config jobs/sweep-cpu.yaml

report:
	$(PGRPO) report runs/sweep-full --out report/sweep-full

report-cpu:
	$(PGRPO) report runs/sweep-cpu --out docs/results/cpu-phenomenon

clean:
	rm -rf build *.egg-info pgrpo/_C*.so
