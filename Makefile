# pysandbox — top-level targets. `make demo` is the README's first command, `make test` its second.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_OUT := agentapi/proto/agent_pb2.py agentapi/proto/agent_pb2_grpc.py

.PHONY: deps host-packages venv proto bytecode guest-image check demo test unit integration lint bench clean \
	campaign

deps: host-packages venv proto bytecode

host-packages:
	@scripts/install-host-packages.sh

# The project's directory as a plain path in a .pth (setuptools' compat editable mode) instead
# of the import finder of its default mode: every Python process of a pod starts ~10-25 ms
# sooner and imports less (docs/performance.md). Should setuptools drop compat mode: the default.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[dev]' \
		|| $(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Byte code beside the sources, as installing a package writes it: these machines set
# PYTHONDONTWRITEBYTECODE=1, so without it every command compiles what it imports (20-25 ms).
bytecode: venv proto
	@$(PY) -m compileall -q -j0 sandbox agent agentapi ocispec hypervisor >/dev/null

proto: $(PROTO_OUT)

$(PROTO_OUT): agentapi/proto/agent.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		--grpc_python_out=. agentapi/proto/agent.proto

include guest-image/guest-image.mk

PYTEST := $(VENV)/bin/pytest

# The README's second command: everything set up, then the whole suite (VM tests included).
test: deps guest-image
	$(PYTEST) -q -rs tests

# Fault-injection and hostile-input campaigns at full size (docs/security.md, "Campaigns");
# `make test` runs the same tests small. Prints what each campaign tried and what happened.
CAMPAIGN_TESTS := tests/unit/test_hostile_guest.py tests/unit/test_hostile_cli.py tests/unit/ocispec \
	tests/unit/test_template_gc.py tests/integration/test_faults.py
campaign: deps guest-image
	PYSANDBOX_HYPOTHESIS=large PYSANDBOX_CAMPAIGN=large $(PYTEST) -q -rs -s $(CAMPAIGN_TESTS)

unit: deps
	$(PYTEST) -q tests/unit

integration: deps guest-image
	$(PYTEST) -q tests/integration

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy sandbox agent agentapi ocispec hypervisor

check: deps
	$(VENV)/bin/pysandbox check

# The README's first command: install what is missing, build the guest image, run a workload.
demo: deps guest-image
	$(VENV)/bin/pysandbox check
	$(VENV)/bin/pysandbox run --rm default echo "hello from a pysandbox VM"

bench: deps guest-image floor-image
	$(PY) bench/run.py --boot restored
	$(PY) bench/run.py --boot cold
	$(PY) bench/cli.py
	$(PY) bench/network.py

clean:
	rm -rf $(VENV) build $(PROTO_OUT) agentapi/proto/agent_pb2.pyi
