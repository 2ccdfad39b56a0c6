"""The trio side: the step loop, bounded admission, token streams and the cancellation bookkeeping
that releases a request's KV before the next step is planned.

May import: trio, and `config`, `errors`, `types`. It talks to the model only through the `Runner`
Protocol in `trioserve.types`, so it never imports `trioserve.model` (or torch): the engine is tested
with a fake runner under trio's MockClock.
"""
