"""Chaos scenarios on bad input and security, at `make test` size (full size: `make chaos`)."""

from chaos.scenarios import check_small


def test_16_poison_records_are_dead_lettered_and_consumers_keep_going() -> None:
    check_small(16)


def test_18_header_injection_and_smtp_smuggling() -> None:
    check_small(18)


def test_19_no_open_relay_keys_tenants_and_secrets() -> None:
    check_small(19)


def test_17_report_parser_address_validator_and_classifier_under_fuzzing() -> None:
    check_small(17)
