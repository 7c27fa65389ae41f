# projected-grpo recipes. On a fresh clone `make fast-dev-run` and `make test` each run `make setup` first
# (once: a stamp file records it; it reruns when pyproject.toml, setup.py, the lock file or csrc/ change).
PY        ?= .venv/bin/python
PGRPO     ?= .venv/bin/pgrpo
TORCH_SPEC ?= torch==2.14.1
# FORCE_CUDA=1 compiles csrc/cuda/*.cu with nvcc even without a GPU (CI does this); 0 forces CPU-only.
FORCE_CUDA ?=
TORCH_CUDA_ARCH_LIST ?= 9.0
APT_PACKAGES = bubblewrap prometheus docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

STAMP     := .venv/.pgrpo-setup

.PHONY: setup apt venv install lock test test-fast bench bench-kernel bench-grader bench-step \
        fast-dev-run demo substrate smoke-vanilla smoke-projected extract download-model queue-full queue-cpu phenomenon-cpu report report-cpu \
        clean gpu-check gpu-check-dry

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-lock.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	$(MAKE) apt venv install
	touch $@

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
	$(PY) -m pip install -q -r requirements-lock.txt

# the project with its test/report/tensorboard extras (runtime dependencies: pyproject.toml)
install:
	FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=2 \
	  $(PY) -m pip install -q -e ".[dev]" --no-build-isolation
	$(PY) -c "import pgrpo.ops as o; print('pgrpo installed; extension:', o.HAVE_EXTENSION)"

# re-pin the CI/dev environment after a dependency change in pyproject.toml
lock:
	{ echo "# The CI/dev environment, pinned: \`pip freeze\` of the venv CI builds (make setup), minus the project itself."; \
	  echo "# Regenerate after changing pyproject.toml: make lock. Runtime installs use pyproject.toml's ranges instead."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E "^(projected-grpo|pgrpo)=="; } > requirements-lock.txt

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: bench-kernel bench-grader bench-step

bench-kernel: $(STAMP)
	$(PGRPO) bench kernel

bench-grader: $(STAMP)
	$(PGRPO) bench grader

bench-step: $(STAMP)
	$(PGRPO) bench step

# everything that needs a GPU in one run (< 5 min on one H100/H200): build, CUDA tests, op parity + timings at
# Qwen3-4B shapes, bench step on the 4B-shape model, 2 training steps; results in gpu_check_out/gpu_check.json
gpu-check: $(STAMP)
	PY=$(PY) OUT=gpu_check_out bash tools/gpu_check.sh

# the same script on the CPU at small shapes (CI runs it via tests/test_gpu_check.py so it cannot rot)
gpu-check-dry: $(STAMP)
	PY=$(PY) OUT=gpu_check_out/dry GPU_CHECK_DRY=1 bash tools/gpu_check.sh

fast-dev-run: $(STAMP)
	$(PGRPO) train --config jobs/fast-dev-run.yaml --out runs/fast-dev-run --overwrite

# The CPU substrate (docs/experiments.md): texts + warm-started tiny Qwen3, each built only if its content stamp
# changed; then vanilla GRPO on it, printing per step the hack, pass and hacked-tests rates and the held-out probe.
substrate: $(STAMP)
	$(PY) -m pgrpo.substrate ensure --out runs/substrate

demo: $(STAMP) substrate
	$(PGRPO) train --config jobs/demo.yaml --out runs/demo --overwrite

smoke-vanilla: $(STAMP)
	$(PGRPO) train --config jobs/smoke-vanilla.yaml --out runs/smoke-vanilla --overwrite

smoke-projected: $(STAMP) extract
	$(PGRPO) train --config jobs/smoke-projected.yaml --out runs/smoke-projected --overwrite

extract: $(STAMP)
	mkdir -p runs/vhack
	$(PGRPO) extract --config jobs/smoke-projected.yaml --out runs/vhack/vhack.safetensors

download-model: $(STAMP)
	$(PY) -c "from huggingface_hub import snapshot_download; print(snapshot_download('Qwen/Qwen3-4B'))"

queue-full: $(STAMP)
	$(PGRPO) sweep --config jobs/sweep-full.yaml

queue-cpu: $(STAMP)
	$(PGRPO) sweep --config jobs/sweep-cpu.yaml

phenomenon-cpu: $(STAMP)
	$(PGRPO) sweep --config jobs/sweep-cpu-phenomenon.yaml
	$(PGRPO) report runs/sweep-cpu-phenomenon --out runs/sweep-cpu-phenomenon/report

report: $(STAMP)
	$(PGRPO) report runs/sweep-full --out report/sweep-full

report-cpu: $(STAMP)
	$(PGRPO) report runs/sweep-cpu --out docs/results/cpu-phenomenon

clean:
	rm -rf build *.egg-info pgrpo/_C*.so
