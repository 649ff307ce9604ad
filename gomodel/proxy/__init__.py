"""The one way from a route to an upstream and back: the exchange, the stream relay, SSE observers."""
