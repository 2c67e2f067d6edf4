# mcast_trio: the single entry point for developers and CI.
#   make test   - build and install into .venv, run the whole suite in a private netns
#   make demo   - mcast-trio demo: simulated DAQ + live monitor on loopback, in a private netns
#                 (installs the cli extra only: click, rich)
#                 (the terminal monitor in a terminal, until q; headless lines for 10 s otherwise)
#   make bench  - the benchmarks (compiled vs reference, side by side)
#   make docs   - build the Sphinx docs with warnings as errors
#   make fuzz   - bounded fuzzing of every parser (FUZZ_RUNS inputs per target)
#   make sanitize - the compiled decoder under ASan + UBSan on a short corpus
#   make soak   - 10 million readouts sender -> decoding receiver: loss and memory (minutes)
#   make multihost - sender and receivers on separate "hosts" (network namespaces)

PYTHON ?= python3
VENV   ?= .venv
VPY     = $(VENV)/bin/python
NETNS   = tools/netns-run
SOURCES = pyproject.toml setup.py _mcast_trio_launch.py $(wildcard mcast_trio/*.py mcast_trio/*.pyx mcast_trio/*/*.py)
PYTEST_ARGS ?=

.PHONY: install test test-reference demo bench docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python $(SOURCES)
	$(VPY) -m pip install -q ".[test,mcl]"
	touch $@

install: $(VENV)/.installed

# The demo needs the command's extra only (click, rich), not the test tools.
$(VENV)/.demo-installed: $(VENV)/bin/python $(SOURCES)
	$(VPY) -m pip install -q ".[cli]"
	touch $@

# Tests run against the installed package (not the source tree) inside a
# private network namespace; the compiled decoder must be active.
test: install
	$(NETNS) env MCAST_TRIO_REQUIRE_INSTALLED=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

# The same suite with the pure-Python reference decoder selected on purpose.
test-reference: install
	$(NETNS) env MCAST_TRIO_REQUIRE_INSTALLED=1 MCAST_TRIO_DECODER=python $(VENV)/bin/pytest $(PYTEST_ARGS)

# The installed console script (run from the source tree, `python -m` would
# import the uncompiled package).
demo: $(VENV)/.demo-installed
	$(NETNS) $(VENV)/bin/mcast-trio demo $(DEMO_ARGS)

bench: install
	$(NETNS) $(VPY) benchmarks/bench_decode.py
	$(NETNS) $(VPY) benchmarks/bench_transport.py
	$(NETNS) $(VPY) benchmarks/bench_send.py
	$(NETNS) $(VPY) benchmarks/bench_receive_path.py
	$(NETNS) $(VPY) benchmarks/bench_tools.py

docs: install
	$(VPY) -m pip install -q ".[docs]"
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf build dist *.egg-info docs/_build mcast_trio/*.c mcast_trio/*.so

# Not part of the default suite: minutes. SOAK_ARGS="--datagrams 2000000 --rate 50000"
SOAK_ARGS ?=
.PHONY: soak multihost

soak: install
	$(NETNS) $(VPY) benchmarks/soak.py $(SOAK_ARGS)

# The multi-host tests (also part of `make test`) and a demonstration.
multihost: install
	$(NETNS) env MCAST_TRIO_REQUIRE_INSTALLED=1 $(VENV)/bin/pytest tests/test_multihost.py -v $(PYTEST_ARGS)
	$(NETNS) $(VPY) tools/multihost.py demo

# Bounded fuzzing (fuzz/run.py): FUZZ_RUNS inputs per target and/or
# FUZZ_SECONDS per target (0: no time limit), with atheris when it installs,
# else the pure-Python mutational engine. Fails on an undocumented exception,
# a compiled != reference result, or RSS growth (FUZZ_RSS_MB per million).
FUZZ_RUNS    ?= 1000000
FUZZ_SECONDS ?= 0
FUZZ_ENGINE  ?= auto
FUZZ_RSS_MB  ?= 4
FUZZ_TARGETS ?=

.PHONY: fuzz sanitize

# atheris is the `fuzz` extra of pyproject.toml; it ships binary wheels
# (no clang needed). Where it does not install, make fuzz still runs.
$(VENV)/.fuzz-installed: $(VENV)/.installed
	$(VPY) -m pip install -q "atheris>=2.3" \
	  || echo "atheris did not install: make fuzz uses the pure-Python mutational engine"
	touch $@

fuzz: $(VENV)/.fuzz-installed
	$(VPY) fuzz/run.py --engine $(FUZZ_ENGINE) --runs $(FUZZ_RUNS) --seconds $(FUZZ_SECONDS) \
	  --rss-limit-mb $(FUZZ_RSS_MB) --artifacts build/fuzz $(FUZZ_TARGETS)

# The same check as tests/test_sanitizer.py, standalone (needs Cython, gcc, libasan).
sanitize: install
	$(VPY) -m pip install -q "Cython>=3.0,<4"
	$(VPY) fuzz/sanitize.py
