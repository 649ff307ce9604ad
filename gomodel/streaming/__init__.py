"""Relaying upstream bodies to clients: the relay, and SSE framing/observation."""
