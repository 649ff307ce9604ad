"""Virtual models (one name, several weighted targets) and failover candidates.

A virtual model's targets are model selectors, each resolved like any
request's model. For each request the targets are put in order: the one
chosen by smooth weighted round robin among the targets that have a ready
replica with room for it (those with a ready replica when all are full; with
C{session_affinity}, the first of them in its key's rendezvous order: the same in
every gateway process, with no pin kept, so a session that had to leave its target
comes back to it, in every process, once it can serve again), then the
others by weight; then the model's failover candidates. The
exchange tries them in that order, before the first byte only.
"""

from hashlib import blake2b
from math import inf, log

from gomodel.errors import ModelNotFound


class VirtualModel:
    """The targets of one virtual model and the state of their rotation."""

    def __init__(self, config):
        self.source = config.source
        self.targets = config.targets  # ((selector, weight), ...)
        self.session_affinity = config.session_affinity
        self._current = [0.0] * len(self.targets)

    def order(self, resolve, live, affinity_of=None):
        """The resolved targets in the order to try them.

        @param resolve: selector -> L{gomodel.routing.registry.Route} (raises L{ModelNotFound}).
        @param live: a function of a route: 2 when a ready replica of it has room for the request now, 1
            when ready ones are all full, 0 (or false) when none is ready.
        @param affinity_of: a function giving the request's session key, or None.
        """
        affinity = affinity_of() if affinity_of is not None and self.session_affinity else None
        routes = []
        for i, (selector, weight) in enumerate(self.targets):
            try:
                routes.append((i, resolve(selector), weight))
            except ModelNotFound:
                continue
        if not routes:
            raise ModelNotFound(self.source)
        # those that can start it now, else those with a ready replica (all full), else all of them
        available, best = [], 1
        for route in routes:
            standing = live(route[1])
            if standing > best:
                available, best = [], standing
            if standing == best:
                available.append(route)
        available = available or routes
        first = self._next(available) if affinity is None else self._drawn(available, affinity)
        rest = sorted((r for r in routes if r is not first), key=lambda r: -r[2])
        return [first[1]] + [r[1] for r in rest]

    def _drawn(self, candidates, affinity):
        """The target of a session (C{affinity}, its key): weighted rendezvous hashing of its key with each
        candidate's selector, the same in every gateway process (each keeps only its own rotation, for requests
        without a session), each target drawn by as many sessions as its weight says; one leaving the candidates
        moves only its own sessions, each to its next in their order."""
        best, lowest = None, inf
        for candidate in candidates:
            digest = blake2b(f"{affinity}\0{self.targets[candidate[0]][0]}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
            uniform = (int.from_bytes(digest, "big") + 1) / 2.0 ** 64  # in (0, 1]
            score = -log(uniform) / candidate[2]
            if score < lowest:
                best, lowest = candidate, score
        return best

    def _next(self, candidates):
        """Smooth weighted round robin (nginx's): each pick adds every weight, takes the largest."""
        total = 0.0
        best = None
        for candidate in candidates:
            i, _, weight = candidate
            self._current[i] += weight
            total += weight
            if best is None or self._current[i] > self._current[best[0]]:
                best = candidate
        self._current[best[0]] -= total
        return best
