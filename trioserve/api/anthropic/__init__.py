"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``), served on the chat path
as the Responses API is: its wire models and error shape (`protocol`), a request as a chat request
(`input`), the event sequence of a stream (`stream`), and `MessagesService` (`service`).

May import what `trioserve.api` may, and the chat modules beside it.
"""
