"""trioserve: an OpenAI-compatible server for Hugging Face transformers causal LMs, built on trio."""

__version__ = "0.1.0"
