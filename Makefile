# Two commands on a fresh machine: `make serve` runs the server, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# make test runs the suite against what ships: the wheel, installed into a virtual environment
# made afresh, with no link back to the checkout.
DIST := dist
WHEEL_VENV := .venv-wheel
SERVING := $(VENV)/.serving
INSTALLED := $(VENV)/.installed
ARGS ?=
SOAK_SECONDS ?= 1800
N ?= 3
CLUSTER_PORT ?= 50051
CLUSTER_DIR ?= .cluster

.PHONY: help install gen serve cluster test lint typecheck unit wheel installed bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

PROTOS := $(wildcard protos/nestkv/*/*.proto)

$(SERVING): pyproject.toml setup.py protos/generate.py $(PROTOS) | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(INSTALLED): pyproject.toml setup.py protos/generate.py $(PROTOS) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(SERVING)

install: $(INSTALLED)  ## virtual environment with the package (editable) and test tools

gen: $(INSTALLED)  ## regenerate the protobuf code beside protos/**/*.proto
	$(BIN)/python protos/generate.py

serve: $(SERVING)  ## run the server (installs what serving needs, no test tools): make serve ARGS="--port 50051"
	$(BIN)/python -m nestkv.server $(ARGS)

cluster: $(SERVING)  ## N nodes on this machine, ports CLUSTER_PORT on, data in CLUSTER_DIR/node-I, each line led by its node; stops on Ctrl-C or SIGTERM: make cluster N=3
	exec $(BIN)/python deploy/cluster.py $(N) $(CLUSTER_PORT) $(CLUSTER_DIR) $(ARGS)

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

lint: gen  ## ruff check and format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: gen  ## mypy
	$(BIN)/mypy

unit: gen  ## the suite against the checkout (editable install): the quick loop while editing
	$(BIN)/pytest $(ARGS)

wheel: $(INSTALLED)  ## build the wheel into dist/ as `pip install .` builds it (isolated build environment)
	rm -rf $(DIST) build
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir $(DIST) .
	rm -rf build

installed: wheel  ## the suite against the wheel, installed into a fresh virtual environment
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/pip install --quiet "$$(ls $(DIST)/nestkv-*.whl)[test]"
	NESTKV_TEST_INSTALLED=1 $(WHEEL_VENV)/bin/pytest $(ARGS)

test: lint typecheck installed  ## everything CI runs

soak: gen  ## the model-based, fuzz, crash, resize, fault-injection and tenant tests at ten times CI's size, stopped after SOAK_SECONDS
	NESTKV_SOAK=1 timeout $(SOAK_SECONDS) $(BIN)/pytest tests/test_model.py tests/server/test_fuzz.py \
		tests/server/test_durability.py tests/server/test_memory.py tests/server/cluster/test_resize.py \
		tests/test_faults.py tests/server/cluster/test_tenants.py tests/server/test_answers.py

bench: gen  ## GrpcStore vs RedisStore vs LocalStore (bench/results.json, throughput.png); snapshot costs (bench/snapshot.json); clusters of 1-3 nodes (bench/cluster.json); --replicas 2 against 1, and failover (bench/replicas.json); another tenant's wait behind a flood of batches (bench/fairness.json); increments against Redis INCR (bench/atomic.json); a rate-limited Litestar app, nestkv vs the stock middleware over Redis (bench/ratelimit.json); scan pages over 1M keys, and the designs rejected (printed)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } || \
		echo "redis-server could not be installed: the Redis rows will be skipped"
	$(BIN)/python -m bench --json bench/results.json --chart bench/throughput.png $(ARGS)
	$(BIN)/python -m bench.snapshot > bench/snapshot.json
	cat bench/snapshot.json
	$(BIN)/python -m bench.cluster --json bench/cluster.json
	$(BIN)/python -m bench.replicas --json bench/replicas.json
	$(BIN)/python -m bench.fairness --json bench/fairness.json
	$(BIN)/python -m bench.atomic --json bench/atomic.json
	$(BIN)/python -m bench.ratelimit --json bench/ratelimit.json
	$(BIN)/python -m bench.scan
	$(BIN)/python -m bench.scan_alternatives

clean:  ## remove the virtual environments, builds, caches and generated code
	rm -rf $(VENV) $(WHEEL_VENV) $(DIST) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis $(CLUSTER_DIR)
	find protos -name '*_pb2*.py*' -delete
