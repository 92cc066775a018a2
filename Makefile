# xdplb: one rule chain. `make test` and `make demo` work on a fresh Debian 12 machine
# (as root): they install what is missing, build, and run.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev gcc make iproute2 ethtool \
            iptables nftables systemd bird2 linux-perf binutils
BUILD_LOCK := /tmp/xdplb-build.lock

.PHONY: all deps venv build test demo bench lab-up lab-down install clean

all: build

deps:
	@missing=""; \
	for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

venv: $(VPY)

# bpf/*.bpf.c -> build/bpf/*.bpf.o -> *.skel.h -> lb/_native (cffi), all in build_ffi.py
build: deps venv
	flock $(BUILD_LOCK) $(VPY) -m pip install -q -e '.[test,bench]'

test: build
	$(VPY) -m pytest -q

demo: build
	$(VPY) -m lb.lab.demo

bench: build
	$(VPY) -m bench all

lab-up: build
	$(VENV)/bin/xdplb lab up

lab-down:
	$(VENV)/bin/xdplb lab down

# The package in its own venv under PREFIX, the unit, and /etc/xdplb/lb.toml (an existing
# one is never overwritten). Then: edit /etc/xdplb/lb.toml; systemctl enable --now xdplb
PREFIX ?= /opt/xdplb
install: deps
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade pip
	flock $(BUILD_LOCK) $(PREFIX)/bin/python -m pip install -q .
	install -d /etc/systemd/system
	sed "s#/opt/xdplb#$(PREFIX)#g" config/xdplb.service > /etc/systemd/system/xdplb.service
	install -d -m 0755 /etc/xdplb
	test -e /etc/xdplb/lb.toml || install -m 0644 config/lb.toml /etc/xdplb/lb.toml
	ln -sfn $(PREFIX)/bin/xdplb /usr/local/bin/xdplb
	-systemctl daemon-reload 2>/dev/null

clean:
	rm -rf build lb/_native*.so lb/_native.c lb/_native.o *.egg-info
