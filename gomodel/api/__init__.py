"""The HTTP API: the cross-cutting front resource and the Klein route groups."""
