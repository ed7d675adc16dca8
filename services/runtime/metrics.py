"""Prometheus metrics shared by the runtime; services add their own next to their logic."""

from prometheus_client import Counter, Gauge

RECORDS_CONSUMED = Counter("mailrail_records_consumed_total", "Records consumed", ["loop", "topic"])
RECORDS_PRODUCED = Counter("mailrail_records_produced_total", "Records produced", ["topic"])
RECORDS_REJECTED = Counter(
    "mailrail_records_rejected_total", "Records sent to mail.rejected", ["loop", "topic", "code"]
)
IN_FLIGHT = Gauge("mailrail_records_in_flight", "Records consumed and not yet committed", ["loop"])
PAUSED = Gauge("mailrail_consumer_paused", "1 while the loop has paused its partitions", ["loop"])
COMMITS = Counter("mailrail_commits_total", "Offset commits", ["loop"])
EVENTS = Counter("mailrail_events_total", "Delivery events emitted", ["type", "pool"])
