"""The bench's arithmetic, without processes: `.venv/bin/pytest bench/tests`."""

import math

from bench.analysis import percentile, summarise_collapsed, sustained_or_drain, sustained_window
from bench.procs import ProcStat, descendants, tree_cpu_s
from bench.sampler import Sample


def sample(t: float, delivered: int, cpu: float = 0.0) -> Sample:
    return Sample(t, delivered, 0, 0, {"sender": (1, cpu)}, {}, 0.0, 0.0)


def test_sustained_window_leaves_out_ramp_and_drain() -> None:
    samples = [sample(t, 100 * t, cpu=0.1 * t) for t in range(11)]  # 100/s for 10 s
    window = sustained_window(samples, base=0, expected=1000)
    assert window is not None
    assert (window.first.delivered, window.last.delivered) == (100, 900)
    assert window.rate_per_s == 100
    assert math.isclose(window.cpu_ms_per_msg(["sender"]), 1.0)


def test_sustained_window_stops_when_submission_stopped_unless_too_short() -> None:
    samples = [sample(t, 100 * t) for t in range(11)]
    window, drain = sustained_or_drain(samples, 0, 1000, until_t=6.0)
    assert window is not None and window.last.t == 6.0 and not drain
    window, drain = sustained_or_drain(samples, 0, 1000, until_t=2.0)
    assert window is not None and window.last.t == 9.0 and drain


def test_cpu_of_a_restarted_process_is_not_counted() -> None:
    first = sample(0, 0, cpu=5.0)
    last = Sample(10, 1000, 0, 0, {"sender": (2, 1.0)}, {}, 0.0, 0.0)
    window = sustained_window([first, last], 0, 1000, lo=0.0, hi=1.0)
    assert window is not None and window.cpu_s() == {}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert math.isnan(percentile([], 0.5))


def test_tree_cpu_counts_reaped_children_once() -> None:
    master = ProcStat(10, 1, utime=5, stime=5, cutime=30, cstime=10, start_ticks=0, rss_pages=0)
    child = ProcStat(11, 10, utime=20, stime=0, cutime=0, cstime=0, start_ticks=0, rss_pages=0)
    other = ProcStat(12, 1, utime=99, stime=0, cutime=0, cstime=0, start_ticks=0, rss_pages=0)
    members = descendants(10, [master, child, other])
    assert sorted(m.pid for m in members) == [10, 11]
    assert math.isclose(tree_cpu_s(members), 0.7)  # (10 + 40 + 20) ticks at 100 Hz


def test_profile_summary_separates_waits_and_charges_areas() -> None:
    lines = [
        "main (a.py);deliver (/x/services/sender/deliver.py);compose (/x/services/sender/compose.py)"
        ";as_bytes (/usr/lib/python3.11/email/message.py) 3",
        "main (a.py);select (x);EpollSelector.select (/usr/lib/python3.11/selectors.py) 5",
        "main (a.py);deliver (/x/services/sender/deliver.py) 1",
    ]
    summary = summarise_collapsed(lines)
    assert summary.samples == 4
    assert math.isclose(summary.idle_share, 5 / 9, rel_tol=1e-3)
    assert dict(summary.by_area)["stdlib email package"] == 0.75
    assert summary.top_self[0][0].startswith("as_bytes")
