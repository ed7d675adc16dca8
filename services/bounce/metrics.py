"""Metrics of the bounce service."""

from services.runtime.telemetry_metrics import counter, gauge

REPORTS = counter(
    "mailrail_bounce_reports_total",
    "Reports received over SMTP, by verdict (bounce, complaint, unsubscribe, unmatched,"
    " unparsed, ignored, not-stored)",
    ["verdict"],
)
RCPT_REFUSED = counter(
    "mailrail_bounce_rcpt_refused_total", "Recipients refused at RCPT, by reply code", ["code"]
)
SOFT_BOUNCES = counter(
    "mailrail_soft_bounces_total", "Soft bounces counted towards the soft-bounce limit"
)
SOFT_LIMIT_SUPPRESSIONS = counter(
    "mailrail_soft_bounce_suppressions_total", "Addresses suppressed for reaching the soft limit"
)
SOFT_TRACKED = gauge(
    "mailrail_soft_bounce_addresses",
    "Addresses with soft bounces inside the window, per partition",
    ["partition"],
)
