# The two commands: `make demo` and `make test`. Both set up .venv/ first (reused while setup.py
# and the constraints are unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmdata-setup
EXTRAS ?= cpu,beam,dask,audio,curate,fast,see,dev
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	rm -rf demo_corpus demo_out
	$(PY) -m pipelines.demo_corpus demo_corpus --copies 3
	$(VENV)/bin/mmdata build --input demo_corpus --out demo_out --config pipelines/configs/demo.yaml
	$(VENV)/bin/mmdata verify demo_out
	$(VENV)/bin/mmdata search demo_out --key animals_chelsea -k 3
	@echo "demo output: $(CURDIR)/demo_out  (shards in demo_out/shards, summary in demo_out/manifest.json)"
	@$(PY) -m pipelines.demo_next demo_out --mmdata $(VENV)/bin/mmdata --python $(PY)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf demo_corpus demo_out bench_out .pytest_cache
