# mcast_trio: the single entry point for developers and CI.
#   make test   - build and install into .venv, run the whole suite in a private netns
#   make demo   - simulated DAQ + live monitor on loopback, in a private netns
#   make bench  - the benchmarks (compiled vs reference, side by side)
#   make docs   - build the Sphinx docs with warnings as errors

PYTHON ?= python3
VENV   ?= .venv
VPY     = $(VENV)/bin/python
NETNS   = tools/netns-run
SOURCES = pyproject.toml setup.py $(wildcard mcast_trio/*.py mcast_trio/*.pyx mcast_trio/*/*.py)
PYTEST_ARGS ?=

.PHONY: install test test-reference demo bench docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python $(SOURCES)
	$(VPY) -m pip install -q ".[test,mcl]"
	touch $@

install: $(VENV)/.installed

# Tests run against the installed package (not the source tree) inside a
# private network namespace; the compiled decoder must be active.
test: install
	$(NETNS) env MCAST_TRIO_REQUIRE_INSTALLED=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

# The same suite with the pure-Python reference decoder selected on purpose.
test-reference: install
	$(NETNS) env MCAST_TRIO_REQUIRE_INSTALLED=1 MCAST_TRIO_DECODER=python $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: install
	$(NETNS) $(VPY) -m mcast_trio.demo

bench: install
	$(NETNS) $(VPY) benchmarks/bench_decode.py

docs: install
	$(VPY) -m pip install -q ".[docs]"
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf build dist *.egg-info docs/_build mcast_trio/*.c mcast_trio/*.so
