"""Chaos scenarios on SMTP and DNS, at `make test` size (full size: `make chaos`).

The receiving side misbehaves (a cut during DATA, no reply to the final dot, a 421 greeting,
mixed RCPT replies, broken DNS, SIZE and SMTPUTF8 limits); every accepted recipient must still
end in its one right final state, and every possible duplicate must be counted and flagged.
"""

from chaos.scenarios import check_small


def test_9_cut_during_data_is_retried_and_delivered_once() -> None:
    check_small(9)


def test_10_lost_reply_to_the_dot_is_retried_and_flagged() -> None:
    check_small(10)


def test_11_greeting_421_and_mixed_rcpt_replies() -> None:
    check_small(11)


def test_14_dns_matrix() -> None:
    check_small(14)


def test_15_size_limit_and_missing_smtputf8() -> None:
    check_small(15)
