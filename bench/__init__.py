"""Benchmarks for xdsserver (issue 6): ``.venv/bin/python -m bench [--scale small|large|both] [--json out.json]``.

Not timed unit tests: numbers are printed against the issue's targets and written as JSON with a
description of the machine they were measured on (``bench/results/``).
"""
