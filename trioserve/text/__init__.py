"""Tokens and grammars: chat templates, the UTF-8-safe incremental detokenizer and stop matcher,
JSON-schema and tool-call grammars (llguidance), and the tool-call and reasoning syntaxes of model
families; images into prompt tokens through a vision-language model's processor (`processor`).

May import: transformers' tokenizers and processors, llguidance, torch (the grammar bitmask rows), and `config`,
`errors`, `types`. Never trio, and nothing above it.
"""
