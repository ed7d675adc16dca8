"""The pass/fail table, with the fix under each row that needs one."""

from collections import Counter

from services.doctor.checks import Check, Status

NAME_WIDTH_MAX = 44


def render(domain: str, checks: list[Check]) -> str:
    width = min(max((len(c.name) for c in checks), default=0), NAME_WIDTH_MAX)
    lines = [f"Mail authentication and reputation checks for {domain}", ""]
    lines.append(f"  {'RESULT':<6}  {'CHECK':<{width}}  DETAIL")
    for check in checks:
        lines.append(f"  {check.status.value:<6}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status is not Status.PASS:
            lines.append(f"  {'':<6}  {'':<{width}}  fix: {check.fix}")
    counts = Counter(c.status for c in checks)
    summary = ", ".join(f"{counts[s]} {s.value.lower()}" for s in Status)
    lines += ["", f"summary: {len(checks)} checks: {summary}"]
    return "\n".join(lines) + "\n"
