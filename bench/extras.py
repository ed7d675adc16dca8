"""The bench's stand-alone parts, run by `make bench` after the pipeline phases.

Each runs as its own process against the local broker (`make bench` starts it with
`kafka-up`), bounded in time, and its result is kept under its own key:

- `ingest_alone`: `bench.ingest_load` — ingest by itself, accepted recipients per second
  (batched requests) and accept latency when paced at half the 3,000/s target;
- `quota_accuracy`: `bench.quota_accuracy` — measured against configured rate per
  destination with 1, 2 and 4 senders and across a rebalance;
- `suppression_memory`: `bench.suppression_memory` — bytes per suppressed address of the
  suppression view at 1,000,000 addresses.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    log.info("running %s %s", module, " ".join(args))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )


def ingest_alone(quick: bool) -> dict[str, Any]:
    seconds = "5" if quick else "15"
    done = _run("bench.ingest_load", ["--seconds", seconds], timeout_s=300)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def quota_accuracy(quick: bool) -> dict[str, Any]:
    args = ["--window-s", "20", "--senders", "1", "2"] if quick else ["--window-s", "60"]
    _run("bench.quota_accuracy", args, timeout_s=1800)
    result: dict[str, Any] = json.loads((REPO / "bench/results/quota-latest.json").read_text())
    return result


def suppression_memory(quick: bool) -> dict[str, Any]:
    addresses = "100000" if quick else "1000000"
    with tempfile.TemporaryDirectory(prefix="bench-suppression-") as tmp:
        out = Path(tmp) / "result.json"
        _run("bench.suppression_memory", ["-n", addresses, "--json", str(out)], timeout_s=900)
        (result,) = json.loads(out.read_text())
    return dict(result)


def run_all(quick: bool) -> dict[str, Any]:
    """Every part; one that fails is logged and reported as its error, not fatal."""
    results: dict[str, Any] = {}
    for name, part in (
        ("ingest_alone", ingest_alone),
        ("quota_accuracy", quota_accuracy),
        ("suppression_memory", suppression_memory),
    ):
        try:
            results[name] = part(quick)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            stderr = getattr(exc, "stderr", "") or ""
            log.error("%s failed: %s %s", name, exc, stderr[-2000:])
            results[name] = {"error": f"{exc}"[:500]}
    return results
