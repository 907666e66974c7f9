# Snapper: the two things a newcomer runs on a fresh Debian 12 machine (as root).
#   make demo   install what is missing, then run a local fleet end to end
#   make test   install what is missing, then run every test tier
#
# Everything installs into .venv; system packages come from Debian's archive.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
APT_PKGS := zfs-fuse openssh-client openssh-server libxml2-utils python3-venv python3-pip \
            qemu-system-x86 qemu-utils mmdebstrap e2fsprogs zookeeper

.PHONY: deps demo test test-host test-vm test-soak lint bench

$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# The distribution was called "snapper" before it became snapper-zone:
	@# drop an old install, or two distributions would claim snapper_zone.
	$(VPY) -m pip uninstall -q -y snapper 2>/dev/null || true
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

# promtool checks and evaluates monitoring/'s alert rules in the tests. It comes
# from Debian's prometheus package, unpacked into the venv rather than installed:
# installing that package would also start a Prometheus server.
$(VENV)/bin/promtool: | $(VENV)/.installed
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	{ apt-get download -q prometheus 2>/dev/null || \
	  { apt-get update -q && apt-get download -q prometheus; }; } && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > "$(abspath $@).tmp" && \
	chmod 755 "$(abspath $@).tmp" && mv "$(abspath $@).tmp" "$(abspath $@)" && \
	echo "installed $@ (from Debian's prometheus package)"

deps: $(VENV)/.installed $(VENV)/bin/promtool

demo: deps
	$(VENV)/bin/snapper demo

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Host tier: zfs-fuse on file-backed pools (started and stopped by the fixtures).
test-host: deps
	$(VPY) -m pytest -rs -q -p no:cacheprovider --durations=15 -m "not soak" tests

# Soak tier: a real local fleet under load and a seeded fault schedule, then the
# invariants (soak/); SNAPPER_SOAK_SECONDS sets the load time (default 120; each
# of the four fleet soaks takes about 3-4 minutes; the policy agents' two soaks
# (static pairs, a coordinator), at most 60 s of load each, about a minute and a
# half each). Longer: python -m soak --duration N.
test-soak: deps
	$(VPY) -m pytest -rs -q -p no:cacheprovider -m soak tests/test_soak.py

# OpenZFS 2.3 tier: the ZFS layer's tests and those needing resume, bookmarks or
# zvols (marked openzfs), in a qemu VM under TCG (~17x slower than the host; the
# image is cached outside the repo, the first build takes about 12 minutes).
# -v: one line per test, so a long run shows its progress.
test-vm: deps
	PYTHON=$(VPY) tools/zvm/test.sh -rs -v -p no:cacheprovider -m openzfs tests

test: lint test-host test-soak test-vm

bench: deps
	$(VPY) bench/push_throughput.py
