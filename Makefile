# optbench: `make bench` runs the default benchmark (every optimizer, equal tuning budget, seeds, report) on the
# embedded corpus; `make test` runs the test suite. Both set up .venv first.
# `make help` lists every target.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DATA    := data/cache/kjv/meta.json data/cache/kjv512/meta.json
ARGS    ?=
NPROC   ?= 2

.PHONY: help setup data bench bench-standard ladder ddp perf gpu-check test test-all lint clean-venv

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned dependencies (CPU torch 2.13.0)

data/cache/kjv/meta.json: $(STAMP)
	$(PY) -m data.prepare kjv --out data/cache/kjv --vocab-size 4096 --num-proc 2

data/cache/kjv512/meta.json: $(STAMP)
	$(PY) -m data.prepare kjv --out data/cache/kjv512 --vocab-size 512 --num-proc 2

data: $(DATA)  ## prepare the embedded KJV corpus at vocabularies 4096 and 512 (tokenizer + shards, offline, cached)

bench: $(DATA)  ## the default benchmark (protocol v2): 9 methods + 2 variants, 5 trials x 2 knobs, 3 paired seeds x 3 budgets on GPT-2 micro, then the report
	$(PY) scripts/bench.py tiny $(ARGS)

bench-standard: $(DATA)  ## the standard CPU benchmark (protocol v2, ~3.5-4 h on 2 cores, resumable): 7 methods + Muon+PC, 7 trials x 2 knobs, 5 paired seeds x 3 budgets on GPT-2 2x128, KJV-512
	$(PY) scripts/bench.py standard $(ARGS)

ladder: $(DATA)  ## the CPU scaling ladder (resumable): AdamW, Muon, NorMuon, PolarGrad at 4 sizes, 10 tokens/parameter; its top rung is bench-standard's
	$(PY) scripts/ladder.py cpu $(ARGS)

perf: $(DATA)  ## step-cost benchmark on the CPU-small preset (~4 min): results/perf/cpu_small.{json,md}
	$(PY) scripts/perf.py cpu_small $(ARGS)

gpu-check: $(DATA)  ## on one CUDA GPU (<= 8 min): env, perf gpt2_124m, 30-step runs of every optimizer, torchrun, FSDP refusal: results/gpu/<gpu>.{json,md}
	$(PY) scripts/gpu_check.py $(ARGS)

ddp: $(DATA)  ## train.py on NPROC (2) processes via torchrun (gloo on CPU, nccl on GPUs); ARGS must set hydra.run.dir
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) train.py $(ARGS)

test: $(STAMP)  ## the default test suite (slow and GPU tests excluded)
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)  ## every CPU test, the slow ones included
	$(PY) -m pytest -m "not gpu" $(ARGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

clean-venv:  ## remove .venv
	rm -rf .venv
