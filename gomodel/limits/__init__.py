"""Rate limits and budgets for keys, user paths, providers and models.

L{specs} (what a limit is, GoModel's configuration forms), L{counters} (the
local and Redis counters), L{limiter} (admission under rate limits) and
L{budgets} (spend per period).
"""
