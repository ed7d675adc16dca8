"""`make chaos`: run the fault-injection scenarios and print what was lost and duplicated.

    python -m chaos                  every scenario, full size
    python -m chaos --only 3,4       some of them
    python -m chaos --small          the `make test` sizes (quicker)
    python -m chaos --list           what there is

Exit status 1 when any scenario failed its checks. Needs the local broker (`make kafka-up`)
for every scenario but those that start their own brokers (1 and 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

from chaos.oracle import Verdict
from chaos.report import table, write_results
from chaos.scenarios import all_scenarios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scenario numbers")
    parser.add_argument("--small", action="store_true", help="the shorter make-test sizes")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scenarios = all_scenarios()
    if args.list:
        for number, scenario in scenarios.items():
            extra = " (make chaos only)" if scenario.chaos_only else ""
            print(f"{number:>3}  {scenario.title}{extra}")
        return 0
    chosen = [int(n) for n in args.only.split(",") if n.strip()] if args.only else list(scenarios)
    unknown = [n for n in chosen if n not in scenarios]
    if unknown:
        parser.error(f"no scenario {unknown}; --list shows them")
    verdicts: list[Verdict] = []
    for number in chosen:
        scenario = scenarios[number]
        print(f"--- scenario {number}: {scenario.title}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            outcome = scenario.run(not args.small)
            found = outcome if isinstance(outcome, list) else [outcome]
        except Exception as exc:
            traceback.print_exc()
            found = [Verdict(str(number), scenario.title, error=f"{type(exc).__name__}: {exc}")]
        for verdict in found:
            verdict.elapsed_s = (time.monotonic() - started) / len(found)
            verdicts.append(verdict)
            print(verdict.summary(), file=sys.stderr, flush=True)
    print(table(verdicts))
    path = write_results(verdicts, small=args.small)
    print(f"details: {path}", file=sys.stderr)
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
