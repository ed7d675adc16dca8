"""Prometheus metrics of the bounce service."""

from prometheus_client import Counter, Gauge

REPORTS = Counter(
    "mailrail_bounce_reports_total",
    "Reports received over SMTP, by verdict (bounce, complaint, unsubscribe, unmatched,"
    " unparsed, ignored, not-stored)",
    ["verdict"],
)
RCPT_REFUSED = Counter(
    "mailrail_bounce_rcpt_refused_total", "Recipients refused at RCPT, by reply code", ["code"]
)
SOFT_BOUNCES = Counter(
    "mailrail_soft_bounces_total", "Soft bounces counted towards the soft-bounce limit"
)
SOFT_LIMIT_SUPPRESSIONS = Counter(
    "mailrail_soft_bounce_suppressions_total", "Addresses suppressed for reaching the soft limit"
)
SOFT_TRACKED = Gauge(
    "mailrail_soft_bounce_addresses",
    "Addresses with soft bounces inside the window, per partition",
    ["partition"],
)
