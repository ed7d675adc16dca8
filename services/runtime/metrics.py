"""Metrics shared by the runtime; services add their own next to their logic.

The pipeline's counts are `mailrail_events_total{type,pool}`, counted where each event is
written: `accepted` (ingest), `queued` (= routed) and `suppressed` (router), `delivered`,
`deferred`, `bounced`, `expired` (sender), `complained`, `unsubscribed` (bounce, ingest);
bounces also by category in `mailrail_bounces_total{pool,category}`. Consumer lag is in
`lag.py`; the instruments behind `counter` and `gauge` in `telemetry_metrics.py`.
"""

from services.runtime.telemetry_metrics import counter, gauge

RECORDS_CONSUMED = counter("mailrail_records_consumed_total", "Records consumed", ["loop", "topic"])
RECORDS_PRODUCED = counter("mailrail_records_produced_total", "Records produced", ["topic"])
RECORDS_REJECTED = counter(
    "mailrail_records_rejected_total", "Records sent to mail.rejected", ["loop", "topic", "code"]
)
IN_FLIGHT = gauge("mailrail_records_in_flight", "Records consumed and not yet committed", ["loop"])
PAUSED = gauge("mailrail_consumer_paused", "1 while the loop has paused its partitions", ["loop"])
COMMITS = counter("mailrail_commits_total", "Offset commits", ["loop"])
EVENTS = counter("mailrail_events_total", "Delivery events emitted", ["type", "pool"])
BOUNCES = counter("mailrail_bounces_total", "Bounced recipients by category", ["pool", "category"])
