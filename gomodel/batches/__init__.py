"""Batches executed by the gateway itself (vLLM has no batch API)."""
