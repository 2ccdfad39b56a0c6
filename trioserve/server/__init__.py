"""The HTTP edge: the Quart-Trio app and its routes, per-request connection state, SSE framing, metrics,
the OpenAPI document, and our fixes to Hypercorn.

May import: quart, quart_trio, hypercorn, h2, h11, trio, prometheus_client, and `trioserve.api`,
`trioserve.engine` and everything below them. Nothing below imports this package; only `trioserve.cli`
does.
"""
