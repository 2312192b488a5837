# pysandbox — top-level targets. `make demo` is the README's first command, `make test` its second.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_OUT := agent/proto/agent_pb2.py agent/proto/agent_pb2_grpc.py

.PHONY: deps host-packages venv proto guest-image check demo test unit integration lint bench clean

deps: host-packages venv proto

host-packages:
	@scripts/install-host-packages.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

proto: $(PROTO_OUT)

$(PROTO_OUT): agent/proto/agent.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		--grpc_python_out=. agent/proto/agent.proto

include guest-image/guest-image.mk
