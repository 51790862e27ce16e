# blockrep build/test entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the real-guest test (issue 13) boots the cloud kernel with a busybox-static initramfs
# the Pacemaker agent's tests (issue 14): a real cluster, ocf-tester, xmllint for the DTD
DEBS   := qemu-utils qemu-system-x86 nbdkit libnbd-bin fio systemd \
          linux-image-cloud-amd64 busybox-static e2fsprogs \
          pacemaker corosync pacemaker-cli-utils resource-agents libxml2-utils
# tool -> Debian package, checked before the tests run
TOOLS  := qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
          qemu-system-x86_64:qemu-system-x86 nbdkit:nbdkit nbdinfo:libnbd-bin \
          nbdcopy:libnbd-bin fio:fio systemd-analyze:systemd \
          mkfs.ext4:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs \
          pacemakerd:pacemaker corosync:corosync crm_attribute:pacemaker-cli-utils \
          cibadmin:pacemaker-cli-utils ocf-tester:resource-agents xmllint:libxml2-utils
# packages of DEBS with no tool to look for (a kernel in /boot; busybox must be the static
# one), checked with dpkg-query where there is one
PKGS   := linux-image-cloud-amd64 busybox-static

.PHONY: test venv debs lint bench demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

debs:
	@missing=""; for t in $(TOOLS); do \
	  cmd=$${t%%:*}; pkg=$${t##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if command -v dpkg-query >/dev/null 2>&1; then for pkg in $(PKGS); do \
	  dpkg-query -W -f='$${db:Status-Abbrev}' $$pkg 2>/dev/null | grep -q '^ii' \
	    || missing="$$missing $$pkg"; \
	done; fi; \
	if [ -n "$$missing" ]; then \
	  missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing tools; install them with: sudo apt-get install -y $$missing" >&2; exit 1; \
	  fi; \
	fi

# the tests whose requests go through NBD exports (where the fast path is taken), run
# again with the general path forced: it stays the reference (issue 15)
GENERAL_PATH_TESTS = tests/integration/test_replication_e2e.py \
	tests/integration/test_replication_shared_disk.py \
	tests/interop/test_replication_qemu_pair.py tests/interop/test_nbd_interop.py \
	tests/integration/test_ha_failover_point.py tests/integration/test_ha_consistency_group.py \
	tests/faults/test_replication_failures.py \
	tests/faults/test_ha_faults.py::test_primary_sigkill_under_load_secondary_equals_model

test: venv debs
	$(PY) -m pytest -q -x -p no:cacheprovider tests
	BLOCKREP_FAST_PATH=0 $(PY) -m pytest -q -x -p no:cacheprovider $(GENERAL_PATH_TESTS)

# the newcomer's first command: a pair on loopback, a workload, a failover, the proof
demo: venv
	$(VENV)/bin/blockrep demo
	$(VENV)/bin/blockrep demo --mode shared

lint: venv
	$(VENV)/bin/ruff check blockrep tests bench
	$(VENV)/bin/ruff format --check blockrep tests bench
	$(VENV)/bin/mypy blockrep

# every benchmark in bench/; each writes bench/results/<name>.json and .md
# (replication: buffers in /dev/shm as the HA manager keeps them, both modes)
bench: venv debs
	$(PY) bench/qcow2.py
	$(PY) bench/nbd.py
	$(PY) bench/nbd.py --fill write --transports unix --name nbd-large-folios
	$(PY) bench/jobs.py
	$(PY) bench/replication.py --buffer-dir /dev/shm --shared
	$(PY) bench/ha.py
	$(PY) bench/reprotect.py
	$(PY) bench/security.py
	$(PY) bench/guarantees.py
	$(PY) bench/pacemaker.py

clean:
	rm -rf $(VENV) build *.egg-info
