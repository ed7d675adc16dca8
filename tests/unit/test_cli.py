"""The `mailrail` command line's answers that need no broker."""

from __future__ import annotations

import pytest

from services.cli.app import main


def run(*args: str) -> tuple[int, list[str]]:
    printed: list[str] = []
    return main(list(args), printed.append), printed


def test_purge_asks_for_yes_first() -> None:
    code, printed = run("purge", "gmail.com", "--pool", "marketing")
    assert code == 2
    assert printed == [
        "would bounce every queued message for domain:gmail.com@pool:marketing accepted until"
        " now (category purged); run again with --yes"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("quota", "gmail.com"), "needs a rate"),
        (("quota", "gmail.com", "fast"), "not a rate"),
        (("pause",), "name a destination, a pool or a tenant"),
        (("move", "gmail.com"), "the pool to move to"),
        (("pause", "gmail.com", "--for", "soon"), "not a duration"),
    ],
)
def test_wrong_commands_say_why(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(*args)
    assert code == 2 and message in capsys.readouterr().err


def test_unknown_pools_are_refused_when_the_rules_are_known(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAILRAIL_RULES", "deploy/local/rules.yaml")
    code, _ = run("pause", "--pool", "nope")
    assert code == 2 and "unknown pool 'nope'" in capsys.readouterr().err
