# The two commands of the README: `make demo` and `make test`. Each runs setup first.
PY := .venv/bin/python

.PHONY: setup test test-fast fuzz demo bench
setup:
	bash tools/setup.sh

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not caffe and not fuzz"

fuzz: setup
	$(PY) -m pytest -m fuzz -q

demo: setup
	$(PY) samples/digits_demo.py
