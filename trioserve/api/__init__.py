"""The wire layer and its services: every API format we serve (OpenAI chat and legacy completions,
tokenize, the Responses API in `api.responses`, Anthropic's Messages API in `api.anthropic`) as pydantic
models, and the services that turn a request into engine work and the engine's tokens into replies.

May import: pydantic, trio (deadlines on token waits, grammar compilation off the loop),
`trioserve.engine`, `trioserve.text`, and `config`, `errors`, `types`. Never `trioserve.model` (the
runner is reached through the engine's `Runner` Protocol) and never the HTTP edge.
"""
