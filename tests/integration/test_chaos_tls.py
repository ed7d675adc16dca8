"""Chaos scenario 13 at `make test` size (full size: `make chaos`).

Expired and wrong-name certificates, a reset in the middle of the handshake and plaintext
injected after STARTTLS, under per-domain TLS policies: where TLS is required, mail is
deferred (4.7.x) and never sent in plaintext; opportunistic TLS goes on unverified or falls
back to plaintext on a new connection; the injected bytes are ignored.
"""

from chaos.scenarios import check_small


def test_13_tls_faults_defer_or_fall_back_as_the_policy_says() -> None:
    check_small(13)
