"""`make run`: the four services and a receiving SMTP sink on loopback, until Ctrl-C.

Any MAILRAIL_* variable already set passes through, so the same stack can relay to another
SMTP server (MAILRAIL_SMART_HOST) or resolve MX with another DNS server (MAILRAIL_DNS).
The process helpers here also start the services in the integration tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SINK_ADDR = "127.0.0.1:2526"
INBOX = REPO / "deploy/local/run/inbox"
STOP_TIMEOUT_S = 90.0


@dataclass
class ServiceProcess:
    """One service as a child process, started and stopped the way Kubernetes would."""

    name: str
    module: str
    env: dict[str, str]
    health_url: str | None = None
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServiceProcess":
        """Start the process; output goes to `log_path` (appended) if set, else to ours."""
        output = None if self.log_path is None else self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=REPO,
            env=self.env,
            stdout=output,
            stderr=output,
        )
        if output is not None:
            output.close()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until `/readyz` answers 200 (or, without a health URL, until it is running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}")
            if self.health_url is None:
                return
            try:
                with urllib.request.urlopen(f"{self.health_url}/readyz", timeout=1) as answer:  # noqa: S310
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Signal the process and wait for it; SIGKILL if it outlives the timeout."""
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def service_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment, then the stack's defaults for anything not already set."""
    env = dict(os.environ)
    for key, value in overrides.items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def isolated_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without its MAILRAIL_* variables, plus `overrides` (for tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRAIL_")}
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def local_services(env_overrides: Mapping[str, str]) -> list[ServiceProcess]:
    def admin(name: str, port: int, module: str, **extra: str) -> ServiceProcess:
        env = service_env({**env_overrides, **extra, "MAILRAIL_ADMIN_ADDR": f"127.0.0.1:{port}"})
        env["MAILRAIL_ADMIN_ADDR"] = f"127.0.0.1:{port}"
        return ServiceProcess(name, module, env, f"http://127.0.0.1:{port}")

    ingest_env = service_env(env_overrides)
    http_addr = ingest_env.setdefault("MAILRAIL_HTTP_ADDR", "127.0.0.1:8080")
    return [
        ServiceProcess("ingest", "services.ingest", ingest_env, f"http://{http_addr}"),
        admin("router", 9191, "services.router"),
        admin("sender-default", 9192, "services.sender", MAILRAIL_POOL="default"),
        admin("sender-marketing", 9193, "services.sender", MAILRAIL_POOL="marketing"),
        admin("bounce", 9194, "services.bounce"),
    ]


def main() -> None:
    INBOX.mkdir(parents=True, exist_ok=True)
    defaults = {
        "MAILRAIL_SMART_HOST": SINK_ADDR,
        "MAILRAIL_API_KEYS": "demo:demo-key",
        "MAILRAIL_ADMIN_KEYS": "demo-admin-key",
        "MAILRAIL_RULES": str(REPO / "deploy/local/rules.yaml"),
        "MAILRAIL_LOG_FORMAT": "text",
        # Every message carries a one-click List-Unsubscribe link to this ingest (RFC 8058).
        "MAILRAIL_PUBLIC_URL": f"http://{os.environ.get('MAILRAIL_HTTP_ADDR', '127.0.0.1:8080')}",
    }
    sink = ServiceProcess(
        "sink",
        "deploy.local.sink",
        service_env({}),
        args=["--listen", SINK_ADDR, "--maildir", str(INBOX)],
    )
    services = [sink.start(), *(s.start() for s in local_services(defaults))]
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping…", file=sys.stderr)
        for service in reversed(services):
            service.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        for service in services:
            service.wait_ready()
    except (RuntimeError, TimeoutError) as exc:
        print(f"stack failed to start: {exc}", file=sys.stderr)
        stop_all()
    ingest = services[1].env["MAILRAIL_HTTP_ADDR"]
    example = {
        "from": "demo@mailrail.example",
        "to": ["you@example.com"],
        "subject": "Hi",
        "text": "Hello",
    }
    print(
        f"\nMailrail is running. Ingest: http://{ingest}  Sink: {SINK_ADDR} (mail lands in {INBOX})\n"
        f"Try: curl -s -X POST http://{ingest}/v1/messages -H 'Authorization: Bearer demo-key' "
        f"-H 'Content-Type: application/json' -d '{json.dumps(example)}'\n"
        f"Status page: http://ops:demo-admin-key@{ingest}/ui  Queues: bin/mailrail queues\n"
        "Ctrl-C stops everything.\n",
        file=sys.stderr,
    )
    while True:
        for service in services:
            if service.popen is not None and service.popen.poll() is not None:
                print(f"{service.name} exited with {service.popen.returncode}", file=sys.stderr)
                stop_all()
        time.sleep(1)


if __name__ == "__main__":
    main()
