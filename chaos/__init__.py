"""Fault injection for the whole pipeline: nothing accepted is lost, duplicates are measured.

`python -m chaos` (`make chaos`) runs the scenarios of issue 10 at full size and prints a
table; `tests/integration/test_chaos_*.py` run the same scenarios, smaller, in `make test`.
Every scenario gets its own topic prefix (and so its own consumer groups), its own service
processes and its own loopback SMTP and DNS servers, and stops everything it started.
See chaos/README.md.
"""
