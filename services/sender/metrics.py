"""The sender's own metrics: per destination (throttle key) and per SMTP transaction.

Gauges carry every destination the sender knows; the histograms carry a destination only
when the rules name it (a provider group or a listed domain), else `other`, so their series
stay few however many domains are mailed.
"""

from schemas.rules import Rules
from services.runtime.telemetry_metrics import gauge, histogram

OTHER = "other"


def destination_label(rules: Rules, key: str) -> str:
    """The histograms' destination label of a throttle key."""
    return key if key in rules.providers or key in rules.domains else OTHER


SMTP_SECONDS = histogram(
    "mailrail_smtp_transaction_seconds",
    "One SMTP transaction, MAIL to the reply after the final dot",
    ["pool", "destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUOTA_WAIT_SECONDS = histogram(
    "mailrail_quota_wait_seconds",
    "Time a message waited for its destination's rate slot",
    ["pool", "destination"],
    buckets=(0, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 60),
)
DESTINATION_RATE = gauge(
    "mailrail_destination_rate_per_s", "Measured send rate", ["pool", "destination"]
)
DESTINATION_QUOTA = gauge(
    "mailrail_destination_quota_per_s",
    "Rate in force after rules, overrides and backoff (-1 = unlimited)",
    ["pool", "destination"],
)
DESTINATION_BACKOFF = gauge(
    "mailrail_destination_backoff_factor",
    "Share of configured rate and concurrency in force (1 = no backoff)",
    ["pool", "destination"],
)
DESTINATION_CONCURRENCY = gauge(
    "mailrail_destination_connections_in_use", "Connections busy", ["pool", "destination"]
)
DESTINATION_MAX_CONNECTIONS = gauge(
    "mailrail_destination_connections_limit",
    "Connections allowed now (configured, cut by backoff)",
    ["pool", "destination"],
)
DESTINATION_OVERRIDE = gauge(
    "mailrail_destination_quota_override_per_s",
    "An operator's quota override in force (-1 = none)",
    ["pool", "destination"],
)
DESTINATION_PAUSED = gauge(
    "mailrail_destination_paused", "1 while a pause is in force", ["pool", "destination"]
)
DESTINATION_HELD = gauge(
    "mailrail_destination_batches_held",
    "Batches put in a delay topic and not read back yet (estimate)",
    ["pool", "destination"],
)
DESTINATION_WAITING = gauge(
    "mailrail_destination_batches_waiting",
    "Batches being delivered or waiting",
    ["pool", "destination"],
)
CONNECTIONS_OPEN = gauge("mailrail_smtp_connections_open", "Open SMTP connections", ["pool"])
