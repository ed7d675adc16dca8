"""Mailrail benchmarks: end-to-end throughput, latency, CPU and memory, beside Postfix.

`make bench` (full), `make bench-quick` (sanity, < 3 minutes), `make bench-soak` (memory over
time). See bench/README.md for what is measured and how.
"""
