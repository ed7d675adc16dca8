"""py-spy on running services: collapsed stacks to `bench/run/profiles/`, summaries to results."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.analysis import summarise_collapsed
from bench.procs import Registry, stop_child

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """Samples several processes at once for `duration_s` (non-blocking: the target is not
    paused while its stack is read, so the profile costs the service almost nothing)."""

    def __init__(self, out_dir: Path, registry: Registry) -> None:
        self.out_dir = out_dir
        self.registry = registry
        self.popens: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, targets: dict[str, int], duration_s: float) -> bool:
        binary = py_spy()
        if binary is None:
            log.warning("py-spy not installed: no profile (pip install py-spy)")
            return False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            command = [binary, "record", "--pid", str(pid), "--duration", str(int(duration_s))]
            command += ["--rate", str(SAMPLE_RATE_HZ), "--nonblocking", "--nolineno"]
            command += ["--format", "raw", "--output", str(self.out_dir / f"{name}.txt")]
            log_file = (self.out_dir / f"{name}.py-spy.log").open("wb")
            popen = subprocess.Popen(command, stdout=log_file, stderr=log_file)
            log_file.close()
            self.popens[name] = popen
            self.registry.add(popen.pid, f"py-spy {name}")
        return True

    def finish(self, timeout_s: float) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for name, popen in self.popens.items():
            try:
                popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                stop_child(popen, 5)
            self.registry.remove(popen.pid)
            path = self.out_dir / f"{name}.txt"
            if not path.exists():
                summaries[name] = {
                    "error": (self.out_dir / f"{name}.py-spy.log").read_text()[-300:]
                }
                continue
            summary = summarise_collapsed(path.read_text().splitlines())
            summaries[name] = asdict(summary) | {"collapsed_stacks": str(path)}
        self.popens.clear()
        return summaries

    def stop(self) -> None:
        for popen in self.popens.values():
            stop_child(popen, 5)
            self.registry.remove(popen.pid)
        self.popens.clear()
