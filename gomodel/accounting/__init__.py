"""What the gateway counts: Prometheus metrics (and the usage ledger next)."""
