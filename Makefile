# The README's two commands: `make demo` (set-up + main job) and `make test` (set-up + tests).
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build.
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test bench

install:
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"

demo: install
	$(PY) -m mpolab demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_decompose.py
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_compress.py
	$(PY) benchmarks/bench_moe.py
	$(PY) benchmarks/bench_gates.py
	$(PY) benchmarks/bench_split.py
	$(PY) benchmarks/bench_peft.py
