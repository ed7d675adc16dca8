"""`mailrail`: pause, resume, quota, move, purge, controls, remove, queues.

Every change is one record on the compacted `mail.control` topic (a tombstone to undo it);
senders obey it within 2 s. `queues` reads `mail.stats`, where every sender writes a snapshot
of its destinations every few seconds. Kafka is reached with the services' own variables
(`MAILRAIL_KAFKA_BOOTSTRAP`, `MAILRAIL_KAFKA_SASL_*`, `MAILRAIL_TOPIC_PREFIX`, ...).
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from schemas.records import ControlAction, ControlCommand, utc_now
from schemas.rules import load_rules
from services.cli.kafka import CliSettings, Kafka, in_force
from services.ops import table
from services.ops.commands import (
    CommandError,
    Target,
    build,
    check_pools,
    key_for,
    parse_duration,
    parse_rate,
)


def _target_args(parser: argparse.ArgumentParser, destination: str | int = "?") -> None:
    parser.add_argument(
        "destination",
        nargs=destination,
        help="a recipient domain or a provider group (the throttle key), e.g. gmail.com",
    )
    parser.add_argument("--pool", help="only this IP pool")
    parser.add_argument("--tenant", help="only this tenant's mail")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrail", description="Steer the Mailrail pipeline (writes mail.control)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pause = sub.add_parser("pause", help="hold the mail of a destination, a pool or a tenant")
    _target_args(pause)
    pause.add_argument("--for", dest="lasting", help="e.g. 30m, 2h (default: until resumed)")
    pause.add_argument("--reason")

    resume = sub.add_parser("resume", help="lift a pause (queued mail goes within seconds)")
    _target_args(resume)

    quota = sub.add_parser("quota", help="override a destination's rate for a time")
    _target_args(quota, destination=1)
    quota.add_argument("rate", nargs="?", help="e.g. 5/s, 300/m, 10000/h")
    quota.add_argument("--for", dest="lasting", help="e.g. 2h (default: until cleared)")
    quota.add_argument("--reason")
    quota.add_argument("--clear", action="store_true", help="remove the override")

    move = sub.add_parser("move", help="send a destination's queued mail through another pool")
    move.add_argument("destination")
    move.add_argument("--to", dest="to_pool", help="the pool to move to")
    move.add_argument("--from", dest="pool", help="only mail of this pool (default: every other)")
    move.add_argument("--for", dest="lasting", help="e.g. 6h (default: until cancelled)")
    move.add_argument("--reason")
    move.add_argument("--cancel", action="store_true", help="stop moving")

    purge = sub.add_parser(
        "purge", help="bounce the queued mail of a destination or tenant (accepted until now)"
    )
    _target_args(purge)
    purge.add_argument("--reason")
    purge.add_argument("--yes", action="store_true", help="really bounce it")

    controls = sub.add_parser("controls", help="list the controls in force")
    controls.add_argument("--json", action="store_true")

    remove = sub.add_parser("remove", help="remove a control by its key (see `controls`)")
    remove.add_argument("key")

    queues = sub.add_parser("queues", help="destinations: queue, rate, quota, backoff, replies")
    queues.add_argument("--pool")
    queues.add_argument("--all", action="store_true", help="also destinations not seen for 1 h")
    queues.add_argument("--json", action="store_true")
    queues.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds")
    return parser


def _target(args: argparse.Namespace) -> Target:
    return Target(args.destination, args.pool, getattr(args, "tenant", None))


def _describe(command: ControlCommand) -> str:
    parts = [command.action.value, command.scope]
    if command.messages_per_s is not None:
        parts.append(f"{command.messages_per_s:g}/s")
    if command.to_pool:
        parts.append(f"to pool {command.to_pool}")
    parts.append(f"until {_when(command.expires_at)}")
    if command.reason:
        parts.append(f"({command.reason})")
    return " ".join(parts)


def _when(moment: datetime | None) -> str:
    return "removed" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


class Cli:
    def __init__(self, kafka: Kafka, pools: list[str] | None, out: Callable[[str], None]) -> None:
        self.kafka = kafka
        self.pools = pools
        self.out = out

    def _write(
        self,
        action: ControlAction,
        args: argparse.Namespace,
        rate_per_s: float | None = None,
        to_pool: str | None = None,
    ) -> int:
        target = _target(args)
        if self.pools is not None:
            check_pools(target, to_pool, self.pools)
        lasting = parse_duration(args.lasting) if getattr(args, "lasting", None) else None
        command = build(
            action,
            target,
            lasting=lasting,
            rate_per_s=rate_per_s,
            to_pool=to_pool,
            reason=args.reason,
        )
        self.kafka.write_control(command.scope, command)
        self.out(_describe(command))
        return 0

    def _remove(self, key: str, what: str) -> int:
        present = key in in_force(self.kafka.controls(), utc_now())
        self.kafka.write_control(key, None)
        self.out(f"removed {what} {key}" if present else f"no {what} in force for {key}; none now")
        return 0

    def pause(self, args: argparse.Namespace) -> int:
        return self._write(ControlAction.PAUSE, args)

    def resume(self, args: argparse.Namespace) -> int:
        return self._remove(key_for(ControlAction.PAUSE, _target(args)), "pause")

    def quota(self, args: argparse.Namespace) -> int:
        args.destination = args.destination[0]
        if args.clear:
            return self._remove(key_for(ControlAction.QUOTA, _target(args)), "quota override")
        if not args.rate:
            raise CommandError("quota needs a rate (e.g. 5/s), or --clear")
        return self._write(ControlAction.QUOTA, args, rate_per_s=parse_rate(args.rate))

    def move(self, args: argparse.Namespace) -> int:
        if args.cancel:
            return self._remove(key_for(ControlAction.MOVE, _target(args)), "move")
        return self._write(ControlAction.MOVE, args, to_pool=args.to_pool)

    def purge(self, args: argparse.Namespace) -> int:
        target = _target(args)
        if not args.yes:
            self.out(
                f"would bounce every queued message for {target.scope} accepted until now"
                " (category purged); run again with --yes"
            )
            return 2
        return self._write(ControlAction.PURGE, args)

    def controls(self, args: argparse.Namespace) -> int:
        commands = in_force(self.kafka.controls(), utc_now())
        if args.json:
            self.out(
                json.dumps(
                    {k: c.model_dump(mode="json", exclude_none=True) for k, c in commands.items()},
                    indent=2,
                )
            )
            return 0
        if not commands:
            self.out("no controls in force")
        for key in sorted(commands):
            self.out(f"{key}\n    {_describe(commands[key])}")
        return 0

    def remove(self, args: argparse.Namespace) -> int:
        return self._remove(args.key, "control")

    def queues(self, args: argparse.Namespace) -> int:
        while True:
            found = table.rows(self.kafka.stats(), pool=args.pool, show_all=args.all)
            if args.json:
                self.out(json.dumps([r.as_dict() for r in found], indent=2))
            else:
                if args.watch:
                    self.out("\x1b[2J\x1b[H" + utc_now().strftime("%H:%M:%S"))
                self.out(table.render(found))
            if not args.watch:
                return 0
            time.sleep(args.watch)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = _parser().parse_args(argv)
    settings = CliSettings()
    pools = load_rules(settings.rules).pool_names() if settings.rules else None
    cli = Cli(Kafka(settings), pools, out)
    try:
        result: int = getattr(cli, args.command)(args)
        return result
    except CommandError as exc:
        print(f"mailrail: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"mailrail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
