"""The Responses API, served on the chat path: its wire models (`protocol`), input items as chat
messages (`input`), the event sequence of a stream (`stream`), the bounded store behind
`previous_response_id` (`store`), and `ResponsesService` (`service`).

May import what `trioserve.api` may, and the chat modules beside it.
"""
