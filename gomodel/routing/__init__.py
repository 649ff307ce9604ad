"""Which upstream serves a model: the registry (discovery, resolution) and selectors."""
