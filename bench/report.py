"""Results: the JSON file (dated, and `latest.json`), the PNG chart, the table on stdout."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.analysis import percentile, rates_per_second
from bench.runner import Options, RunData

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results"
OURS = ("kafka", "ingest", "router", "bounce", "sink")

#: The issue's targets: shown next to what was measured, never asserted.
TARGETS = {
    "delivered_per_s": (">=", 1000.0),
    "throughput_vs_postfix": (">=", 1.5),
    "p99_ms": ("<=", 100.0),
    "sender_rss_mib": ("<=", 150.0),
    "soak_memory_growth_pct": ("<=", 10.0),
    "ingest_recipients_per_s": (">=", 3000.0),
    "ingest_p99_ms_at_half_rate": ("<=", 50.0),
    "quota_worst_error_pct": ("<=", 5.0),
}


def meta(options: Options, started: datetime, kind: str, source: dict[str, Any]) -> dict[str, Any]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "kind": kind,
        "started_at": started.isoformat(),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        **source,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": cpu_model,
            "kernel": platform.release(),
            "python": sys.version.split()[0],
        },
        "options": {k: v for k, v in vars(options).items()},
    }


def _rss_peaks(data: RunData) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for sample in data.samples:
        for name, mib in sample.rss_mib.items():
            if name in OURS or name.startswith("sender-"):
                peaks[name] = max(peaks.get(name, 0.0), mib)
    return {k: round(v, 1) for k, v in sorted(peaks.items())}


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def summarise(data: RunData, options: Options, started: datetime) -> dict[str, Any]:
    r = data.results
    e2e = r.get("end_to_end", {})
    lat50 = r.get("latency", {}).get("50%", {})
    lat80 = r.get("latency", {}).get("80%", {})
    postfix = r.get("postfix", {})
    ours_rate, ours_cpu = _num(e2e.get("delivered_per_s")), _num(e2e.get("cpu_ms_per_msg"))
    pf_rate, pf_cpu = _num(postfix.get("delivered_per_s")), _num(postfix.get("cpu_ms_per_msg"))
    rss = _rss_peaks(data)
    senders = [v for k, v in rss.items() if k.startswith("sender-")]
    top = {
        "delivered_per_s": ours_rate,
        "cpu_ms_per_msg": ours_cpu,
        "p50_ms": _num(lat50.get("p50_ms")),
        "p99_ms": _num(lat50.get("p99_ms")),
        "p50_ms_at_80pct": _num(lat80.get("p50_ms")),
        "p99_ms_at_80pct": _num(lat80.get("p99_ms")),
        "postfix_delivered_per_s": pf_rate,
        "postfix_cpu_ms_per_msg": pf_cpu,
        "throughput_vs_postfix": round(ours_rate / pf_rate, 3) if pf_rate else math.nan,
        "cpu_per_msg_vs_postfix": round(ours_cpu / pf_cpu, 3) if pf_cpu else math.nan,
        "raw_ceiling_per_s": _num(r.get("raw_ceiling", {}).get("smtp_source_to_sink_per_s")),
        "rss_mib": rss,
        "best_scaling_vs_postfix": round(
            max(
                (_num(v.get("delivered_per_s")) for v in r.get("scaling", {}).values()),
                default=math.nan,
            )
            / pf_rate,
            3,
        )
        if pf_rate
        else math.nan,
        "scaling_delivered_per_s": {
            k: v.get("delivered_per_s") for k, v in r.get("scaling", {}).items()
        },
    }
    measured: dict[str, float] = {
        "delivered_per_s": ours_rate,
        "throughput_vs_postfix": _num(top["throughput_vs_postfix"]),
        "p99_ms": _num(top["p99_ms"]),
        "sender_rss_mib": max(senders) if senders else math.nan,
    }
    ingest = r.get("ingest_alone", {})
    if "throughput" in ingest:
        measured["ingest_recipients_per_s"] = _num(ingest["throughput"].get("recipients_per_s"))
        measured["ingest_p99_ms_at_half_rate"] = _num(ingest.get("paced", {}).get("p99_ms"))
    if "worst_error_pct" in r.get("quota_accuracy", {}):
        measured["quota_worst_error_pct"] = _num(r["quota_accuracy"]["worst_error_pct"])
    if "soak" in r:
        growth = r["soak"].get("memory", {})
        measured["soak_memory_growth_pct"] = max(
            (v["growth_pct"] for k, v in growth.items() if k not in ("bench",)), default=math.nan
        )
    top["targets"] = {
        name: {
            "target": f"{op} {limit:g}",
            "measured": measured[name],
            "met": bool(measured[name] >= limit if op == ">=" else measured[name] <= limit)
            if not math.isnan(_num(measured[name]))
            else None,
        }
        for name, (op, limit) in TARGETS.items()
        if name in measured
    }
    return (
        top | r | {"meta": meta(options, started, "soak" if "soak" in r else "bench", data.source)}
    )


def clean(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write(summary: dict[str, Any], data: RunData, started: datetime) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = "soak-" if summary["meta"]["kind"] == "soak" else ""
    stamp = started.strftime("%Y-%m-%dT%H%M%SZ")
    json_path = RESULTS / f"{prefix}{stamp}.json"
    text = json.dumps(clean(summary), indent=2, sort_keys=False) + "\n"
    json_path.write_text(text)
    (RESULTS / f"{prefix or ''}latest.json").write_text(text)
    png_path = RESULTS / f"{prefix}{stamp}.png"
    chart(data, png_path, summary)
    return json_path, png_path


def chart(data: RunData, path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = data.samples
    if not samples:
        return
    t0 = samples[0].t
    fig, (ax_rate, ax_lat, ax_rss) = plt.subplots(3, 1, figsize=(12, 12))
    points = rates_per_second(samples)
    ax_rate.plot([t - t0 for t, _ in points], [v for _, v in points], lw=0.8, color="black")
    colours = {
        "max": "tab:blue",
        "latency": "tab:green",
        "postfix": "tab:red",
        "raw": "tab:gray",
        "warmup": "tab:olive",
        "soak": "tab:green",
    }
    for phase in data.phases:
        ax_rate.axvspan(
            phase.start_t - t0,
            phase.end_t - t0,
            alpha=0.12,
            color=colours.get(phase.kind, "tab:purple"),
        )
        ax_rate.text(
            phase.start_t - t0,
            ax_rate.get_ylim()[1] * 0.02,
            phase.name,
            rotation=90,
            fontsize=7,
            va="bottom",
        )
    ax_rate.set_title(
        f"Delivered to the sink per second — ours {summary.get('delivered_per_s')}/s sustained, "
        f"Postfix {summary.get('postfix_delivered_per_s')}/s"
    )
    ax_rate.set_xlabel("seconds since start")
    ax_rate.set_ylabel("messages/s")

    for name, series in data.latencies.items():
        if not series:
            continue
        start = series[0][0]
        buckets: dict[int, list[float]] = {}
        for t, latency in series:
            buckets.setdefault(int((t - start) // 2), []).append(latency)
        xs = sorted(buckets)
        ax_lat.plot(
            [2 * x for x in xs], [percentile(buckets[x], 0.5) for x in xs], label=f"{name} p50"
        )
        ax_lat.plot(
            [2 * x for x in xs],
            [percentile(buckets[x], 0.99) for x in xs],
            label=f"{name} p99",
            ls="--",
        )
    ax_lat.axhline(100, color="red", lw=0.6, ls=":", label="target p99 100 ms")
    ax_lat.set_yscale("log")
    ax_lat.set_title("Accept → remote 250 latency (2 s buckets, open-loop load)")
    ax_lat.set_xlabel("seconds since the phase began")
    ax_lat.set_ylabel("ms")
    ax_lat.legend(fontsize=7)

    names = sorted({n for s in samples for n in s.rss_mib if n != "bench"})
    for name in names:
        xs = [s.t - t0 for s in samples if name in s.rss_mib]
        ys = [s.rss_mib[name] for s in samples if name in s.rss_mib]
        ax_rss.plot(xs, ys, label=name, lw=0.9)
    ax_rss.set_yscale("log")
    ax_rss.set_title("Resident memory (MiB)")
    ax_rss.set_xlabel("seconds since start")
    ax_rss.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: Any, digits: int = 1) -> str:
    number = _num(value)
    if math.isnan(number):
        return "—"
    return f"{number:,.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    e2e = summary.get("end_to_end", {})
    rows.append(("end to end: delivered/s (sustained)", _fmt(summary["delivered_per_s"])))
    rows.append(
        ("end to end: CPU-ms per message (all processes)", _fmt(summary["cpu_ms_per_msg"], 3))
    )
    for name, value in e2e.get("cpu_ms_per_msg_by_process", {}).items():
        rows.append((f"    {name}", _fmt(value, 3)))
    rows.append(
        (
            "machine busy cores during it / other processes",
            f"{_fmt(e2e.get('machine_busy_cores'), 2)} / {_fmt(e2e.get('other_processes_cores'), 2)}",
        )
    )
    for share, result in summary.get("latency", {}).items():
        rows.append(
            (
                f"latency at {share} ({_fmt(result.get('offered_per_s'), 0)}/s offered, "
                f"{_fmt(result.get('achieved_per_s'), 0)}/s achieved): p50 / p99 ms",
                f"{_fmt(result.get('p50_ms'))} / {_fmt(result.get('p99_ms'))}",
            )
        )
    for name, result in summary.get("consume_latency", {}).items():
        if isinstance(result, dict):
            rows.append(
                (
                    f"one consume stage at 100/s, {name}: p50 / p99 ms",
                    f"{_fmt(result.get('p50_ms'))} / {_fmt(result.get('p99_ms'))}",
                )
            )
    rows.append(("Postfix: delivered/s", _fmt(summary["postfix_delivered_per_s"])))
    rows.append(
        ("Postfix: CPU-ms per message (Postfix + sink)", _fmt(summary["postfix_cpu_ms_per_msg"], 3))
    )
    rows.append(("ours / Postfix: throughput", _fmt(summary["throughput_vs_postfix"], 2)))
    rows.append(("ours / Postfix: CPU per message", _fmt(summary["cpu_per_msg_vs_postfix"], 2)))
    rows.append(
        (
            "ours, best sender count / Postfix: throughput",
            _fmt(summary["best_scaling_vs_postfix"], 2),
        )
    )
    raw = summary.get("raw_ceiling", {})
    rows.append(("raw: smtp-source → sink, msg/s", _fmt(raw.get("smtp_source_to_sink_per_s"))))
    rows.append(
        ("raw: smtp-source → smtp-sink, msg/s", _fmt(raw.get("smtp_source_to_smtp_sink_per_s")))
    )
    for count, result in summary.get("scaling", {}).items():
        rows.append(
            (
                f"scaling: {count} sender(s): delivered/s, CPU-ms/msg",
                f"{_fmt(result.get('delivered_per_s'))}, {_fmt(result.get('cpu_ms_per_msg'), 3)}",
            )
        )
    for name, mib in summary.get("rss_mib", {}).items():
        rows.append((f"peak RSS MiB: {name}", _fmt(mib)))
    ingest = summary.get("ingest_alone", {})
    if "throughput" in ingest:
        paced = ingest.get("paced", {})
        rows.append(
            (
                "ingest alone: accepted recipients/s",
                _fmt(ingest["throughput"].get("recipients_per_s")),
            )
        )
        rows.append(
            (
                f"ingest alone at {_fmt(paced.get('target_recipients_per_s'), 0)}/s: p50 / p99 ms",
                f"{_fmt(paced.get('p50_ms'))} / {_fmt(paced.get('p99_ms'))}",
            )
        )
    for run in summary.get("quota_accuracy", {}).get("runs", []):
        errors = [row["error_pct"] for row in run["destinations"].values()]
        rows.append(
            (
                f"quota accuracy, {run['senders']} sender(s): worst error %",
                _fmt(max(errors, key=abs), 1),
            )
        )
    memory = summary.get("suppression_memory", {})
    if "addresses" in memory:
        rows.append(
            (
                f"suppression view, {memory['addresses']:,} addresses: bytes/address",
                _fmt(memory.get("bytes_per_address") or memory.get("rss_bytes_per_address"), 0),
            )
        )
    soak = summary.get("soak")
    if soak:
        rows.append(
            (
                "soak: rate, p50 / p99 ms",
                f"{_fmt(soak.get('rate_per_s'))}, {_fmt(soak.get('p50_ms'))} / {_fmt(soak.get('p99_ms'))}",
            )
        )
        for name, growth in soak.get("memory", {}).items():
            if name == "bench":
                continue
            rows.append(
                (
                    f"soak memory: {name}",
                    f"{growth['early_mib']} → {growth['late_mib']} MiB ({growth['growth_pct']:+.1f}%)",
                )
            )
    for name, target in summary.get("targets", {}).items():
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        rows.append((f"target {name} {target['target']}", f"{_fmt(target['measured'], 2)}  {met}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
