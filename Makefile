# Two commands set up a fresh machine and run: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench,hf]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m streamssl demo

# Speed and memory goals (tables, plots and JSON under docs/benchmarks/); long on a laptop CPU.
bench: $(STAMP)
	$(BIN)/python benchmarks/attention_memory.py
	$(BIN)/python benchmarks/streaming_rtf.py
	$(BIN)/python benchmarks/memory_mixers.py
	$(BIN)/python benchmarks/summary_mixers.py
	$(BIN)/python benchmarks/emission_delay.py
	$(BIN)/python benchmarks/selective_memory.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
