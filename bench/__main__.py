"""`python -m bench [--quick] [...]` and `python -m bench --soak --soak-s 1800`: see bench/README.md."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from types import FrameType

from bench import extras, report
from bench.runner import Bench, Options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N: a sanity run in < 3 minutes")
    parser.add_argument("--messages", type=int, help="end-to-end messages (default 100000)")
    parser.add_argument("--senders", type=int, default=1, help="sender processes for the main run")
    parser.add_argument("--latency-s", type=float, help="length of each latency phase (60)")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument("--no-scaling", action="store_true", help="skip 1/2/4 senders")
    parser.add_argument("--no-postfix", action="store_true", help="skip Postfix and raw ceilings")
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip ingest alone, quota accuracy and suppression memory (bench/extras.py)",
    )
    parser.add_argument("--soak", action="store_true", help="soak instead of the benchmark")
    parser.add_argument("--soak-s", type=float, default=1800.0, help="soak length (1800)")
    parser.add_argument(
        "--soak-rate", type=float, help="soak rate in msg/s (default: 50%% of a fresh maximum)"
    )
    return parser


def options_from(args: argparse.Namespace) -> Options:
    options = Options(senders=args.senders)
    if args.quick:
        options = Options(
            messages=10_000,
            window=2_000,
            small_messages=3_000,
            warmup=1_000,
            senders=args.senders,
            latency_s=10.0,
            profile_s=5.0,
            scaling_messages=3_000,
            postfix_messages=6_000,
            raw_messages=3_000,
            quick=True,
        )
    if args.messages:
        options.messages = options.postfix_messages = args.messages
    if args.latency_s:
        options.latency_s = args.latency_s
    if args.no_profile:
        options.profile_s = 0.0
    if args.no_scaling:
        options.scaling = ()
    if args.no_postfix:
        options.postfix = False
    if args.soak:
        options.soak_s = args.soak_s
        options.soak_rate = args.soak_rate
    return options


def _terminate(signum: int, _: FrameType | None) -> None:
    """SIGTERM ends the run like Ctrl-C: through every `finally`, so all children stop."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    options = options_from(args)
    started = datetime.now(UTC)
    bench = Bench(options)
    try:
        data = bench.soak() if args.soak else bench.run()
        if not args.soak and not args.no_extras:
            data.results.update(extras.run_all(options.quick))
    except KeyboardInterrupt:
        print("\ninterrupted: everything the bench started has been stopped", file=sys.stderr)
        return 130
    except Exception:
        logging.exception("the bench failed; partial results in bench/run/partial.json")
        (report.REPO / "bench/run/partial.json").write_text(
            json.dumps(report.clean(bench.data.results), indent=2)
        )
        return 1
    summary = report.summarise(data, options, started)
    json_path, png_path = report.write(summary, data, started)
    print()
    print(report.table(summary))
    print(
        f"\nresults: {json_path.relative_to(report.REPO)} (and latest), chart: {png_path.relative_to(report.REPO)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
