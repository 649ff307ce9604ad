"""gomodel: an OpenAI-compatible AI gateway on Twisted, built to front vLLM."""

__version__ = "0.1.0"
