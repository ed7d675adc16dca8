"""Take what a consumer has fetched, waiting only when it has nothing.

`consumer.consume(n, timeout)` returns when `n` records have arrived *or* the timeout ran
out, so at a modest rate every record would wait out most of the timeout at every hop of the
pipeline (`make bench`'s `consume_latency` measures it: about 100 ms per hop at 100 records/s
with a 0.2 s timeout). `take` returns at once what is there, and otherwise blocks only until
the first record arrives.
"""

from confluent_kafka import Consumer, Message


def take(consumer: Consumer, limit: int, timeout_s: float) -> list[Message]:
    """Up to `limit` records already fetched; if none, wait up to `timeout_s` for one."""
    messages = consumer.consume(limit, 0)
    if messages:
        return messages
    one = consumer.poll(timeout_s)
    return [] if one is None else [one]
