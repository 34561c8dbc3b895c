# Two commands set up a fresh machine and run: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[train,test,bench,hf,lhotse,lm,sentences]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m streamssl demo

# Speed and memory goals: every script in benchmarks/ at full size (tables on stdout, plots and JSON under
# docs/benchmarks/); hours on a laptop CPU. streaming_eval.py and serve_load.py measure the demo's model, so
# the demo runs first where its model is missing. Any one script runs in seconds with --smoke (what
# tests/test_benchmarks.py does).
DEMO_MODEL := runs/demo/finetune/checkpoint.pt
DEMO_TEST := runs/demo/corpus/test.jsonl

$(DEMO_MODEL): | $(STAMP)
	$(BIN)/python -m streamssl demo

bench: $(STAMP) $(DEMO_MODEL)
	$(BIN)/python benchmarks/attention_memory.py
	$(BIN)/python benchmarks/streaming_rtf.py
	$(BIN)/python benchmarks/runtime_rtf.py
	$(BIN)/python benchmarks/memory_mixers.py
	$(BIN)/python benchmarks/summary_mixers.py
	$(BIN)/python benchmarks/emission_delay.py --seconds 6
	$(BIN)/python benchmarks/selective_memory.py
	$(BIN)/python benchmarks/step_speed.py --steps 15
	$(BIN)/python benchmarks/streaming_eval.py --checkpoint runs/demo/finetune --data $(DEMO_TEST) --limit 4 \
		--batch-sizes 16 --decoders greedy --int8-data $(DEMO_TEST)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve_load.py --chunks-ms 40 160
	$(BIN)/python benchmarks/serve_soak.py --minutes 30
	$(BIN)/python benchmarks/checkpoint_memory.py
	$(BIN)/python benchmarks/device_check.py --smoke  # CPU, tiny; on a CUDA machine run it without --smoke
	test -f runs/lm/sotu3wf.arpa || $(BIN)/python -m streamssl lm build --english --wordfreq 50000 --order 3 --out runs/lm/sotu3wf.arpa
	$(BIN)/python benchmarks/decoding.py --checkpoint runs/demo/finetune --data $(DEMO_TEST) --lm runs/lm/sotu3wf.arpa
	$(BIN)/python benchmarks/whisper_peer.py --checkpoint runs/demo/finetune --data $(DEMO_TEST) --lm runs/lm/sotu3wf.arpa \
		--tag demo_test
	test -f runs/sentences/test.jsonl || $(BIN)/python -m streamssl corpus synth --out runs/sentences --hours 2.5 \
		--seed 0 --varied-noise --sentences --splits test
	$(BIN)/python benchmarks/whisper_peer.py --checkpoint runs/demo/finetune --data runs/sentences/test.jsonl \
		--every 2 --lm runs/lm/sotu3wf.arpa --tag sentences

# Removes the environment and caches; runs/ (your models and the demo's) stays.
clean:
	rm -rf $(VENV) .venv-runtime .pytest_cache .hypothesis src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
