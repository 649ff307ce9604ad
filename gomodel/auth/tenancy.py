"""Keeping tenants apart: who sees a stored object, and vLLM prefix-cache salts.

Files, batches (and their output files) and stored responses made with a
managed key belong to its tenant: its user path when it has one (a team
shares them), else the key. Another key gets 404 for them and does not see
them listed; the master key sees everything. A key sees its tenant's and what
it made itself without a user path (given one later, it keeps them: they are
the key's, not its new team's); moved to another path, it leaves what it made
in its old team to that team.

vLLM shares its prefix cache between requests: a tenant could time another
tenant's prompts through it. A request of a managed key sent to a vLLM
provider carries a C{cache_salt} derived with a server secret from the key's
tenant (its user path when it has one, so a team shares its cache, else the
key; a batch's lines, its batch's tenant's, wherever the key moved since), replacing a client's own unless the
key is allowed one (C{own_cache_salt}). Its C{kv_transfer_params} and C{ec_transfer_params} are
left out then: they name the KV (encoder) cache blocks a disaggregated vLLM
reads, and the engine it reads them from, every tenant's, past any salt; its
answer from that vLLM goes without them too (L{gomodel.proxy.transfers}). The
master key's requests are left as they are.
"""

import hashlib
import hmac
import os

from twisted.logger import Logger

SALTED_PROVIDER_TYPES = frozenset(("vllm",))
# What names a disaggregated vLLM's cache blocks (and engines) to read: a managed key's never reach it
TRANSFER_FIELDS = frozenset(("kv_transfer_params", "ec_transfer_params"))
SALTS_KEPT = 100000  # tenants' salts kept (a deleted key's tenant leaves its own behind): past it, made again


def tenant_of(principal):
    """The tenant objects made by C{principal} belong to (None for the master key or nobody)."""
    return None if principal is None else principal.tenant


def tenants_of(principal):
    """The tenants whose objects C{principal} sees (a tuple: its tenant, and the key's own where its tenant
    is its user path's), or None for the master key or nobody (everyone's)."""
    if principal is None or principal.master:
        return None
    own = f"key:{principal.id}"
    return (principal.tenant,) if principal.tenant == own else (principal.tenant, own)


def visible(principal, record) -> bool:
    """Whether C{principal} may see C{record} (a file, batch or stored response): one of
    L{tenants_of}'s."""
    if principal is None or principal.master:
        return True
    tenant = record.get("tenant")
    return tenant == principal.tenant or tenant == f"key:{principal.id}"


class CacheSalts:
    """C{cache_salt} per tenant; C{mode} C{"off"} leaves bodies alone."""

    log = Logger()

    def __init__(self, mode="tenant", secret=None, master_key=None):
        """
        @param secret: C{CACHE_SALT_SECRET}; without it one is derived from C{master_key},
            else a random one per process (salts then differ between workers, which only
            costs cache hits: a warning says so).
        """
        self.enabled = mode != "off"
        if secret:
            key = secret.encode("utf-8")
        elif master_key:
            key = hmac.new(master_key.encode("utf-8"), b"gomodel cache_salt", hashlib.sha256).digest()
        else:
            key = os.urandom(32)
            if self.enabled:
                self.log.warn("neither CACHE_SALT_SECRET nor GOMODEL_MASTER_KEY is set: cache salts are random "
                              "per process")
        self._key = key
        self._salts = {}

    def salt(self, tenant: str) -> str:
        """The salt of C{tenant} (stable for the same secret)."""
        salt = self._salts.get(tenant)
        if salt is None:
            if len(self._salts) > SALTS_KEPT:  # (tenants of keys since deleted: made again when asked)
                self._salts.clear()
            salt = self._salts[tenant] = hmac.new(self._key, tenant.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
        return salt

    def apply(self, principal, upstream, body: dict, tenant=None) -> bool:
        """Set C{body["cache_salt"]} for a managed key's request to a vLLM provider, without its
        L{TRANSFER_FIELDS} (see the module); whether it goes without them, its answer too then
        (L{gomodel.proxy.transfers}: a key allowed its own salt, and the master key, keep them both ways).

        @param tenant: whose salt it takes, where that is not the key's tenant now: a batch's line takes its
            batch's (the team its key was in when it made it), wherever the key moved since."""
        if (not self.enabled or principal is None or principal.master
                or upstream.type not in SALTED_PROVIDER_TYPES):
            return False
        if principal.own_cache_salt:
            if "cache_salt" in body:
                return False
        elif not TRANSFER_FIELDS.isdisjoint(body):  # (one test in C where neither came, as almost always)
            for name in TRANSFER_FIELDS:
                body.pop(name, None)
        if tenant is None:
            tenant = principal.tenant
        body["cache_salt"] = self._salts.get(tenant) or self.salt(tenant)
        return not principal.own_cache_salt

    def strips(self, principal, upstream) -> bool:
        """Whether C{principal}'s requests to C{upstream} (a pool) go without their L{TRANSFER_FIELDS}, and so their
        answers (L{apply}'s answer for any body of theirs): where an answer is read apart from its request's body
        (a batch line's, whichever target answered it)."""
        return (self.enabled and principal is not None and not principal.master and not principal.own_cache_salt
                and upstream.type in SALTED_PROVIDER_TYPES)
