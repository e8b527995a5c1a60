# kvmeter's front door. `make demo` and `make test` work from a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PB_COMPAT_VENV ?= .venv-pb321
BIN := $(VENV)/bin
APT_PACKAGES := libvirt-dev libvirt-clients pkg-config gcc python3-dev python3-venv \
	postgresql protobuf-compiler iproute2 procps
# Debian 12's python3-protobuf 3.21.12 is the PyPI runtime 4.21.12.
DEBIAN_PROTOBUF := 4.21.12
AGENT_SIDE := agent proto src/kvmeter
# Packages (packaging/README.md): debhelper + pybuild for the .debs, rpmbuild for the EL9 .rpms,
# debootstrap and systemd-nspawn for the install test, and the two linters.
APT_PACKAGES += debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
	rpm rpmlint lintian debootstrap systemd-container
# CloudStack's RabbitMQ event bus: the tests start their own node (tests/harness/rabbitmq.py).
APT_PACKAGES += rabbitmq-server
# promtool checks and unit-tests the shipped alert rules (tests/unit/test_monitoring.py).
APT_PACKAGES += prometheus

# The real-VM tier (tests/realvm, `kvmeter demo --real-vms`): libvirtd, QEMU and a busybox guest
# on Debian's cloud kernel (its .deb fetched once into build/realvm/debs).
REALVM_PACKAGES := qemu-system-x86 libvirt-daemon-system libvirt-clients busybox-static cpio
REALVM_DEBS := build/realvm/debs
# The programs `make bench` measures kvmeter against, on the same interfaces (bench/peers.py),
# and iptables, which cuts the agent off its broker for the process section's outage.
BENCH_PACKAGES := prometheus-node-exporter collectd-core prometheus-libvirt-exporter iptables

.PHONY: help deps realvm-deps bench-deps venv proto lint typecheck test test-proto-compat unit e2e demo demo-real-vms bench packages test-packages clean

help:
	@echo "make demo   - build a small simulated cloud and meter it (embedded default)"
	@echo "make demo-real-vms - the same cloud on real QEMU guests under a real libvirtd (as root)"
	@echo "make test   - install everything, lint, type-check and run all tests"
	@echo "make bench  - agent, collector, freshness and scale benchmarks side by side (as root)"

# System packages; skipped when already present so repeated runs stay fast. Without systemd no
# package may start its service (rabbitmq-server's postinst would start a system node): a
# policy-rc.d blocks that for the install, unless one is there already.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		blocked=; if [ ! -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && blocked=1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; rc=$$?; \
		if [ -n "$$blocked" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi

# Without recommends: those would pull in a desktop's worth of QEMU display and audio packages.
realvm-deps:
	@missing=$$(for p in $(REALVM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if ! ls $(REALVM_DEBS)/linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then \
		mkdir -p $(REALVM_DEBS) && cd $(REALVM_DEBS) && \
		kernel=$$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $$2; exit}'); \
		if [ -z "$$kernel" ]; then apt-get update -qq; \
			kernel=$$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $$2; exit}'); fi; \
		apt-get download -q -o APT::Sandbox::User=root $$kernel; \
	fi

bench-deps:
	@missing=$$(for p in $(BENCH_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: deps $(BIN)/activate
	$(BIN)/pip install -q -e '.[test]' 'protobuf>=6,<7'

proto:
	protoc --python_out=proto --pyi_out=proto -Iproto proto/kvmeter.proto proto/encoding.proto
	protoc --python_out=tests/proto -Itests/proto tests/proto/legacy_ipmeasure.proto

# The agent side must run on Python 3.9 (EL9); the collector may use 3.11.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/vermin -q --no-tips --violations -t=3.9- --exclude-regex '_pb2\.py$$' $(AGENT_SIDE)

# mypy sees the installed layout (kvmeter.agent, ...) through a tree of links to the sources.
# The 3.9 pass skips site-packages: newer library releases there use 3.10 syntax.
typecheck: venv
	rm -rf build/typecheck && mkdir -p build/typecheck/kvmeter
	for f in src/kvmeter/*; do ln -s ../../../$$f build/typecheck/kvmeter/; done
	ln -s ../../../agent build/typecheck/kvmeter/agent
	ln -s ../../../collector build/typecheck/kvmeter/collector
	ln -s ../../../proto build/typecheck/kvmeter/proto
	ln -s ../../../pipeline build/typecheck/kvmeter/pipeline
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml --python-version 3.9 --no-site-packages \
		-p kvmeter.agent -p kvmeter.proto -m kvmeter -m kvmeter.cli
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml --python-version 3.11 -p kvmeter

# The proto contract under Debian 12's protobuf runtime (the main venv has the newest 6.x).
test-proto-compat: venv
	[ -x $(PB_COMPAT_VENV)/bin/python ] || $(PYTHON) -m venv $(PB_COMPAT_VENV)
	$(PB_COMPAT_VENV)/bin/pip install -q pytest protobuf==$(DEBIAN_PROTOBUF)
	$(PB_COMPAT_VENV)/bin/pip install -q --no-deps -e .
	$(PB_COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --noconftest tests/unit/test_proto_compat.py

test: venv realvm-deps bench-deps lint typecheck test-proto-compat
	$(BIN)/python -m pytest -q --durations=40 tests

unit: venv
	$(BIN)/python -m pytest -q tests/unit

# The whole pipeline under faults, checked against the kernel's counters (also part of `make test`).
e2e: venv
	$(BIN)/python -m pytest -q -s tests/e2e

# .debs (Debian 12 / Ubuntu 24.04) and .rpms (EL9) from this tree into dist/.
packages: deps
	packaging/ci/build-deb.sh
	packaging/ci/build-rpm.sh

# Build, lint and install-test the packages in a clean Debian 12 root (part of `make test` too).
test-packages: venv
	$(BIN)/python -m pytest -q -m packaging tests/packaging

demo: venv
	$(BIN)/kvmeter demo

# The demo on real QEMU guests under a real libvirtd (as root; slower: guests boot under emulation).
demo-real-vms: venv realvm-deps
	$(BIN)/kvmeter demo --real-vms

# Side-by-side benchmarks (as root: network namespaces), not part of `make test`; ~15 minutes.
# BENCH_ARGS=--quick for a smoke run; results in bench/results.json.
bench: venv realvm-deps bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) $(PB_COMPAT_VENV) .pytest_cache .mypy_cache .ruff_cache
