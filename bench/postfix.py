"""The baseline: Debian's Postfix relaying the same kind of messages to the same sink.

A private Postfix instance (its own `config_directory`, queue and data folders under
`bench/run/postfix/`, the system's /etc/postfix untouched) listens on a loopback port and
relays everything to the sink (`relayhost = [127.0.0.1]:<sink port>`). The queue is on disk
as shipped (one file per message, fsync'd); logging goes through postlogd to a file, so the
cost of Postfix's per-message log lines is counted as it would be with syslog. One change
from Debian's master.cf: no chroot (the private queue folder holds no copy of /etc).

`smtp-source` (from the postfix package) injects; `smtp-sink` gives the raw SMTP ceiling.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Popen, Registry, free_port, read_stat, stop_child, stop_pid, wait_for_port

log = logging.getLogger(__name__)

SENDER_ADDRESS = "bench@mailrail.example"
RECIPIENT = "rcpt@d00.bench.example"
MESSAGE_BYTES = 5120
START_TIMEOUT_S = 30.0


def ensure_installed() -> None:
    """Install Debian's postfix non-interactively (no system configuration) when missing."""
    if shutil.which("postconf") and shutil.which("smtp-source"):
        return
    log.info("installing postfix (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
        env=env,
    )
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"],
        check=True,
        env=env,
        timeout=900,
    )


def _cli(*args: str) -> list[str]:
    """Postfix's commands log to stderr only on a terminal: give them one with script(1)."""
    return ["script", "-qec", " ".join(args), "/dev/null"]


class PostfixInstance:
    def __init__(self, run_dir: Path, relay_port: int, registry: Registry) -> None:
        self.dir = run_dir / "postfix"
        self.config = self.dir / "etc"
        self.queue = self.dir / "spool"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.port = free_port()
        self.relay_port = relay_port
        self.registry = registry
        self.master_pid: int | None = None

    def start(self) -> int:
        """Configure and start the instance; returns the master's pid."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for folder in (self.config, self.queue, self.data):
            folder.mkdir(parents=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)
        (self.config / "main.cf").write_text(self._main_cf())
        (self.config / "master.cf").write_text(self._master_cf())
        subprocess.run(_cli("postfix", "-c", str(self.config), "start"), check=True, timeout=60)
        pid_file = self.queue / "pid/master.pid"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.master_pid = int(pid_file.read_text().split()[0])
        self.registry.add(self.master_pid, "postfix-master")
        wait_for_port(self.port, START_TIMEOUT_S)
        return self.master_pid

    def stop(self) -> None:
        if self.master_pid is None:
            return
        subprocess.run(_cli("postfix", "-c", str(self.config), "stop"), check=False, timeout=60)
        stop_pid(self.master_pid, timeout_s=20)
        self.registry.remove(self.master_pid)
        self.master_pid = None

    def queued(self) -> int:
        """Messages still in the queue (incoming, active, deferred)."""
        return sum(
            len(files)
            for name in ("incoming", "active", "deferred", "maildrop")
            for _, _, files in os.walk(self.queue / name)
        )

    def log_counts(self) -> dict[str, int]:
        """Delivery outcomes from the mail log (status=sent/deferred/bounced), and warnings."""
        counts: dict[str, int] = {}
        if not self.maillog.exists():
            return counts
        for line in self.maillog.read_text(errors="replace").splitlines():
            if (match := re.search(r" status=(\w+)", line)) is not None:
                counts[match[1]] = counts.get(match[1], 0) + 1
            elif " warning: " in line or " fatal: " in line or " error: " in line:
                counts["warnings"] = counts.get("warnings", 0) + 1
        return counts

    def _main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
syslog_name = postfix-bench
maillog_file = {self.maillog}
maillog_file_prefixes = {self.dir}
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{self.relay_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
"""

    def _master_cf(self) -> str:
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if not line or line[0] in "# \t" or len(fields) < 8:
                lines.append(line)
            elif fields[:2] == ["smtp", "inet"]:
                lines.append(f"127.0.0.1:{self.port} inet n - n - - smtpd")
            elif fields[1] == "inet":
                lines.append("#" + line)
            else:
                fields[4] = "n"  # chroot
                lines.append(" ".join(fields))
        return "\n".join(lines) + "\n"


@dataclass
class SourceRun:
    seconds: float
    cpu_s: float
    returncode: int


def smtp_source(
    port: int, messages: int, sessions: int = 8, size: int = MESSAGE_BYTES, timeout_s: float = 900
) -> SourceRun:
    """`smtp-source -d` (reused sessions) into 127.0.0.1:port; returns time and its own CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    popen = subprocess.Popen(
        [
            "smtp-source",
            "-d",
            "-N",
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(size),
            "-f",
            SENDER_ADDRESS,
            "-t",
            RECIPIENT,
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = started + timeout_s
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if popen.poll() is None:
        stop_child(popen, 5)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stderr = popen.stderr.read().decode(errors="replace") if popen.stderr else ""
    if popen.returncode:
        log.warning("smtp-source exited %s: %s", popen.returncode, stderr[-500:])
    return SourceRun(seconds, cpu_s, popen.returncode or 0)


class SmtpSink:
    """Postfix's `smtp-sink`: the fastest receiving end there is (counts nothing)."""

    def __init__(self, registry: Registry) -> None:
        self.port = free_port()
        self.registry = registry
        self.popen: Popen | None = None

    def start(self) -> None:
        command = ["smtp-sink"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        self.popen = subprocess.Popen(
            [*command, f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.registry.add(self.popen.pid, "smtp-sink")
        wait_for_port(self.port, 10, self.popen)

    def cpu_s(self) -> float:
        stat = read_stat(self.popen.pid) if self.popen else None
        return 0.0 if stat is None else stat.own_ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.popen is not None:
            stop_child(self.popen, 5)
            self.registry.remove(self.popen.pid)
            self.popen = None
