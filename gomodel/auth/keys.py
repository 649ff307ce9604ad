"""Who sent a request: the master key or a managed key, decided from its headers before any body is read.

The master key (C{GOMODEL_MASTER_KEY}) reaches everything. A managed key
(C{sk_gom_...}, made through the admin API) reaches the inference, models,
files, batches, responses and passthrough routes, never C{/admin/} or
C{/metrics}. Clients send either as C{Authorization: Bearer <key>} or as
C{x-api-key: <key>} (Anthropic-style clients).

Only a managed key's SHA-256 is stored; every process keeps a snapshot of
the keys by hash (L{KeyRing}), so a lookup is one hash and one dict read,
and refreshes it every second from the store: a key deactivated on one
process stops working on every process within about a second, and one that
expires stops at once. A well-formed secret the snapshot lacks (a key made on
another process since the last refresh) is looked up once (L{KeyRing.look_up}):
its request waits for a read of the store begun after it came in.
"""

import hashlib
import hmac
import os
import re
from operator import attrgetter

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gomodel._twistedcompat import plain_headers
from gomodel.errors import AuthenticationFailed, Forbidden, InvalidRequest, StorageUnavailable
from gomodel.http.headers import AUTHORIZATION, X_API_KEY, X_GOMODEL_USER_PATH, cross_site
from gomodel.http.site import IdentityPending
from gomodel.logs import FailureStreak
from gomodel.periodic import Periodic

# Paths that need no key: liveness and readiness checks, with a trailing slash too (the same routes).
OPEN_PATHS = frozenset((b"/health", b"/health/", b"/health/ready", b"/health/ready/"))
# What may follow an open prefix: plain names and folders (no "..", no "%", no empty segment).
_PLAIN_TAIL = re.compile(rb"[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*")
SECRET_PREFIX = "sk_gom_"
REFRESH_INTERVAL = 1.0
# A write committed late by another process can carry an earlier timestamp: every refresh
# looks this far back again (merging a key twice is harmless).
REFRESH_OVERLAP = 5.0
# What new_secret makes: a secret of any other form is never looked up in the store.
_WELL_FORMED = re.compile(rb"sk_gom_[0-9a-f]{64}")
# Methods a page of another site may send an open gateway (L{GatewayAuth}): they change nothing.
_SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
# Seconds a request with a secret the key ring lacks waits for the store before it is refused.
LOOKUP_TIMEOUT = 2.0
# Well-formed secrets the store did not know, kept (up to this many) so that each is looked up once.
UNKNOWN_KEPT = 10000


class Principal:
    """The sender of a request: the master key or one managed key (never its secret).

    @ivar id: C{"master"}, or the managed key's id (what logs and usage name).
    @ivar name: the key's name.
    @ivar user_path: the key's user path (C{/team/alpha}), or None.
    @ivar tenant: who owns what this key makes (C{"path:/team/alpha"} or
        C{"key:<id>"}), None for the master key.
    @ivar models: the model selectors it may use, or None for every model.
    @ivar cache_key: what the gate keeps its limits plan under: its id, or (attributed: L{attributed})
        its id and user path.
    @ivar limited: whether its requests pass limits and budgets: a managed key's, and the master key's
        attributed to a user path.
    @ivar sent_at: model name as sent -> the provider at which its selectors admitted that name as sent (what
        L{gomodel.api.inference.plan_model} worked out once for this principal).
    """

    __slots__ = ("id", "name", "user_path", "tenant", "models", "expires_at", "active", "rpm", "tpm",
                 "max_concurrency", "budgets", "priority", "own_cache_salt", "master", "_exact", "_prefixes",
                 "cache_key", "base", "limited", "sent_at")

    def __init__(self, id, name, *, user_path=None, models=None, expires_at=None, active=True, rpm=None, tpm=None,
                 max_concurrency=None, budgets=(), priority=None, own_cache_salt=False, master=False):
        self.id = id
        self.name = name
        self.user_path = user_path
        self.master = master
        self.tenant = None if master else (f"path:{user_path}" if user_path else f"key:{id}")
        self.models = tuple(models) if models else None
        # L{allows}' selectors: every name where one is C{/}, else exact names and prefixes (those ending in /)
        selectors = self.models or ()
        self._exact = frozenset(m for m in selectors if not m.endswith("/"))
        self._prefixes = ("",) if "/" in selectors else tuple(m for m in selectors if m.endswith("/"))
        self.expires_at = expires_at
        self.active = active
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrency = max_concurrency
        self.budgets = tuple(budgets or ())
        self.priority = priority
        self.own_cache_salt = own_cache_salt
        self.cache_key = id
        self.base = self  # the principal it was attributed from (L{attributed}), else itself
        self.limited = not master or user_path is not None
        self.sent_at = {}

    def attributed(self, user_path):
        """This principal's requests attributed to C{user_path} (C{X-GoModel-User-Path}, for the master key):
        that path's limits and budgets apply and its usage is recorded under it; what it may see and use
        does not change."""
        copy = Principal(self.id, self.name, user_path=user_path, models=self.models, expires_at=self.expires_at,
                         active=self.active, rpm=self.rpm, tpm=self.tpm, max_concurrency=self.max_concurrency,
                         budgets=self.budgets, priority=self.priority, own_cache_salt=self.own_cache_salt,
                         master=self.master)
        copy.tenant = self.tenant  # (the header never changes whose objects it sees)
        copy.cache_key = f"{self.id} {user_path}"
        copy.base = self
        return copy

    @classmethod
    def of_record(cls, record):
        """The principal of a stored key record (see L{gomodel.store.interfaces.IKeyStore})."""
        return cls(record["id"], record["name"], user_path=record.get("user_path"), models=record.get("models"),
                   expires_at=record.get("expires_at"), active=record.get("deactivated_at") is None,
                   rpm=record.get("rpm"), tpm=record.get("tpm"), max_concurrency=record.get("max_concurrency"),
                   budgets=record.get("budgets"), priority=record.get("priority"),
                   own_cache_salt=record.get("own_cache_salt", False))

    def allows(self, name) -> bool:
        """Whether the key may use a model known by C{name} (as the client named it, or qualified as
        routed, C{provider/model}).

        A selector is a provider (C{vllm/}), a qualified model (C{vllm/meta-llama/X}), a bare or
        virtual model name, or C{/} for everything.
        """
        return self.models is None or name in self._exact or name.startswith(self._prefixes)

    def names(self, model_id: str) -> bool:
        """Whether the key's selectors name C{model_id}, a model's id at its provider, as it is: a bare
        selector, never a provider prefix (C{a/} is provider C{a}, not the C{a/x} another provider serves)."""
        return self.models is None or model_id in self._exact

    def allows_provider(self, provider: str) -> bool:
        """Whether the key may use something of C{provider} (a passthrough has no model to check)."""
        return self.models is None or any(s == "/" or s.startswith(provider + "/") for s in self.models)


MASTER = Principal("master", "master", master=True)


def _same(principal, other) -> bool:
    """Whether two principals made of one key's records are alike in everything they hold (but L{Principal.base},
    each its own)."""
    return _compared(principal) == _compared(other)


_compared = attrgetter(*(name for name in Principal.__slots__ if name not in ("base", "sent_at")))


def _unchecked():
    """Why a secret could not be checked: the store did not answer."""
    return StorageUnavailable.because("the API key could not be checked")


def _timed_out(result, timeout):
    raise _unchecked()


def _nobody(failure):
    failure.trap(StorageUnavailable)
    return None


class KeyRing(Periodic):
    """Every managed key by its secret's hash, refreshed from the L{gomodel.store.interfaces.IKeyStore}."""

    log = Logger()
    # Called with a key's budget scope (C{key:<id>}) when its budgets changed (L{gomodel.limits.gate.Gate.renew}).
    budgets_changed = None

    def __init__(self, store, clock, interval=REFRESH_INTERVAL):
        super().__init__(clock, interval)
        self._store = store
        self._by_hash = {}
        self._hash_of = {}  # key id -> hash
        self._updated_of = {}  # key id -> the updated_at of its record held
        self._digests = {}  # secret -> its hash, for secrets of known keys (a hash is the same forever)
        # secret -> its principal, for active keys that never expire (L{find}'s answer, no hash to look up); emptied
        # in place whenever a merge changes a principal (L{GatewayAuth} looks in it first, holding this dict)
        self.found = {}
        self._seen = float("-inf")  # the newest updated_at merged
        self._unknown = set()  # hashes of well-formed secrets a look-up did not find (a secret never comes later)
        self._asked = []  # (digest, Deferred) waiting for the next look-up
        self._looking = False  # a look-up's read of the store is under way
        self._streak = FailureStreak(self, "refreshing the managed keys failed",
                                     "the managed keys are refreshed from the store again")

    def find(self, secret: bytes):
        """The active principal whose secret is C{secret}, or None (unknown, deactivated or expired)."""
        principal = self.found.get(secret)  # (every request of a managed key: one look-up)
        if principal is not None:
            return principal
        digest = self._digests.get(secret)
        if digest is None:
            digest = hashlib.sha256(secret).hexdigest()
            if digest in self._by_hash:
                if len(self._digests) >= 10000:
                    self._digests.clear()
                self._digests[secret] = digest
        principal = self._by_hash.get(digest)
        if principal is None or not principal.active:
            return None
        if principal.expires_at is not None:
            return None if self._clock.seconds() >= principal.expires_at else principal
        if len(self.found) >= 10000:
            self.found.clear()
        self.found[secret] = principal
        return principal

    def look_up(self, secret: bytes):
        """A Deferred firing with the active principal whose secret is C{secret} (as L{find}), after a read of
        the store begun once it was asked: a key made on another process since the last refresh works on its
        first request here. None at once for a secret of another form than L{new_secret}'s, one the snapshot
        holds (deactivated, expired) or one looked up before in vain. It fails with L{StorageUnavailable} when
        the store fails or does not answer within L{LOOKUP_TIMEOUT} seconds: the key cannot be checked (a 503,
        which a client retries; not a 401, for which it drops the key).

        One read is under way at a time, for every secret asked meanwhile: secrets made up by a client
        cost the store at most one read at a time, and each such secret one read only.
        """
        if not _WELL_FORMED.fullmatch(secret):
            return None
        digest = hashlib.sha256(secret).hexdigest()
        if digest in self._by_hash or digest in self._unknown:
            return None
        d = Deferred()
        self._asked.append((digest, d))
        if not self._looking:
            self._look()
        d.addTimeout(LOOKUP_TIMEOUT, self._clock, onTimeoutCancel=_timed_out)
        return d.addCallback(lambda _: self.find(secret))

    def _look(self):
        """Read what changed in the store for the secrets asked so far; then for those asked meanwhile."""
        asked, self._asked = self._asked, []
        self._looking = True
        d = self._store.changed_since(self._seen - REFRESH_OVERLAP)

        def looked(records):
            self._looking = False
            if records is not None:
                self.merge(records, read=True)
                if len(self._unknown) >= UNKNOWN_KEPT:
                    self._unknown.clear()
                self._unknown.update(digest for digest, _ in asked if digest not in self._by_hash)
            for _, waiting in asked:
                if not waiting.called:
                    if records is None:
                        waiting.errback(_unchecked())
                    else:
                        waiting.callback(None)
            if self._asked:
                self._look()

        # (a failed read is told of by the refresh loop; its secrets are not remembered)
        d.addErrback(lambda _: None).addCallback(looked)

    def by_id(self, key_id):
        """The principal of key C{key_id} as last seen (active or not), or None."""
        secret_hash = self._hash_of.get(key_id)
        return None if secret_hash is None else self._by_hash.get(secret_hash)

    def merge(self, records, read=False):
        """Take new or changed key records (this process's admin edits take effect at once); a key whose budgets
        changed is told to L{budgets_changed}, when set.

        @param read: the records were read from the store (a refresh, a look-up): one older than the record held
            is left out (read before an edit whose record was merged here meanwhile).
        """
        for record in records:
            updated_at = record["updated_at"]
            if read and updated_at < self._updated_of.get(record["id"], updated_at):
                continue
            self._updated_of[record["id"]] = updated_at
            old = self._hash_of.get(record["id"])
            before = None if old is None else self._by_hash.get(old)
            if old is not None and old != record["hash"]:
                self._by_hash.pop(old, None)
            self._hash_of[record["id"]] = record["hash"]
            principal = Principal.of_record(record)
            if before is not None and old == record["hash"] and _same(before, principal):
                principal = before  # (a refresh's overlap reads it again: what is kept by it, limits' lanes, stays)
            else:
                self.found.clear()
            self._by_hash[record["hash"]] = principal
            self._seen = max(self._seen, record["updated_at"])
            if before is not None and before.budgets != principal.budgets and self.budgets_changed is not None:
                self.budgets_changed(f"key:{record['id']}")

    def refresh(self):
        """Merge what changed in the store since the last refresh.

        @return: a Deferred firing with None; a failure is logged (the snapshot stays).
        """
        d = self._store.changed_since(self._seen - REFRESH_OVERLAP)
        d.addCallback(self.merge, read=True)
        d.addCallbacks(self._streak.succeeded, self._streak.failed)
        return d


class GatewayAuth:
    """Decides who sent a request when its head is in (see L{gomodel.http.site.GatewayRequest}).

    Without a master key the gateway is open: a request without a key is
    served as nobody's (attributed to the user path of its
    C{X-GoModel-User-Path}, as the master key's are), one with a managed key
    as that key's; but a write a browser sent from another site's page
    (L{gomodel.http.headers.cross_site}) is refused: with no key to send, such a
    page could reach a gateway on its visitor's localhost or intranet.
    """

    def __init__(self, master_key, keys=None, open_paths=(), closed_to_keys=(), open_prefixes=()):
        """
        @param keys: the L{KeyRing}, or None without managed keys.
        @param open_paths: paths besides L{OPEN_PATHS} that need no key (e.g. C{/metrics}
            when C{METRICS_REQUIRE_KEY=false}, the dashboard's page).
        @param closed_to_keys: exact paths only the master key reaches (C{/metrics}); every
            path under C{/admin/} is too.
        @param open_prefixes: path prefixes ending in C{/} under which plain file names need no
            key (C{/admin/static/}: the dashboard's assets); a path with C{..}, C{%} or an empty
            segment after the prefix is not open.
        """
        self._master_key = master_key.encode("utf-8") if master_key else None
        self._keys = keys
        self._found = keys.found if keys is not None else {}  # (L{KeyRing.find}'s first look, inline)
        self._open = OPEN_PATHS | frozenset(p.encode("ascii") for p in open_paths)
        self._open_prefixes = tuple(p.encode("ascii") for p in open_prefixes)
        self._master_only = frozenset(p.encode("ascii") for p in closed_to_keys)
        self._attributed = {}  # (principal's cache_key, user path) -> its attributed principal

    def __call__(self, request, path: bytes):
        """The L{Principal} who sent C{request}: L{MASTER}, a managed key, or None (open path or gateway).

        @raise AuthenticationFailed: the key is missing or wrong (or deactivated, or expired).
        @raise Forbidden: a managed key on a route only the master key reaches; on an open gateway, a write a
            browser sent from another site's page (C{cross_site_request}).
        @raise IdentityPending: a well-formed secret this process does not hold: its Deferred fires with the
            principal (or fails as above) once the key ring looked it up (L{KeyRing.look_up}).
        """
        # (a path under none of the open prefixes, as almost all are, told in C: no walk of them)
        if path in self._open or (self._open_prefixes and path.startswith(self._open_prefixes)
                                  and self._open_below(path)):
            return None
        if self._master_key is None:
            if request.method not in _SAFE_METHODS and cross_site(request):
                raise Forbidden("A browser sent this request from another site's page, which an open gateway (no "
                                "master key) does not take: only a page of the gateway's own (the dashboard) or a "
                                "client that is no browser.", code="cross_site_request")
            token = presented_key(request, required=False)
            principal = self._keys.find(token) if token and self._keys is not None else None
            if principal is None:
                if token and self._keys is not None:
                    self._look_up(token, path, required=False)
                values = plain_headers(request.requestHeaders).get(X_GOMODEL_USER_PATH)
                if values is not None:  # (as the master key's: an open gateway's backend names its user's path)
                    return self._attribute(MASTER, values)
        else:
            token = presented_key(request)
            if hmac.compare_digest(token, self._master_key):
                values = plain_headers(request.requestHeaders).get(X_GOMODEL_USER_PATH)
                return MASTER if values is None else self._attribute(MASTER, values)
            principal = self._found.get(token)  # (L{KeyRing.find}'s look for a key seen before: every request of one)
            if principal is None:
                principal = self._keys.find(token) if self._keys is not None else None
                if principal is None:
                    if self._keys is not None:
                        self._look_up(token, path)
                    raise AuthenticationFailed("Invalid API key.")
            if path.startswith(b"/admin/") or path in self._master_only:  # (L{_allowed}, inline: a managed key's)
                raise Forbidden("This route needs the gateway's master key; a managed key cannot use it.",
                                code="master_key_required")
            return principal
        return self._allowed(principal, path)

    def _allowed(self, principal, path):
        """C{principal}, unless it is a managed key on a route only the master key reaches (L{Forbidden}); the
        same check is inline in L{__call__}, on every request."""
        if principal is not None and (path.startswith(b"/admin/") or path in self._master_only):
            raise Forbidden("This route needs the gateway's master key; a managed key cannot use it.",
                            code="master_key_required")
        return principal

    def _look_up(self, token, path, required=True):
        """Raise L{IdentityPending} while the key ring looks C{token} up in the store (L{KeyRing.look_up});
        return when it will not."""
        looking = self._keys.look_up(token)
        if looking is None:
            return

        def found(principal):
            if principal is None and required:
                raise AuthenticationFailed("Invalid API key.")
            return self._allowed(principal, path)

        if not required:  # an open gateway serves a secret it could not check as nobody's, as one it lacks
            looking.addErrback(_nobody)
        raise IdentityPending(looking.addCallback(found))

    def _attribute(self, principal, values):
        """C{principal} attributed to the user path of the C{X-GoModel-User-Path} header's C{values}.

        @raise InvalidRequest: it is no user path (C{invalid_user_path}), or was sent twice, differently.
        """
        user_path = header_user_path(values)
        if user_path == "/":
            return principal  # (everything: attributed to no path)
        key = (principal.cache_key, user_path)
        attributed = self._attributed.get(key)
        if attributed is None or attributed.base is not principal:
            if len(self._attributed) > 10000:
                self._attributed.clear()
            attributed = self._attributed[key] = principal.attributed(user_path)
        return attributed


    def _open_below(self, path: bytes) -> bool:
        """Whether C{path} is a plain name under an open prefix."""
        for prefix in self._open_prefixes:
            if path.startswith(prefix) and _PLAIN_TAIL.fullmatch(path, len(prefix)):
                return True
        return False


def header_user_path(values) -> str:
    """The user path of the C{X-GoModel-User-Path} header's C{values} (its raw values), normalised as a key's.

    @raise InvalidRequest: it is no user path (C{invalid_user_path}), or was sent twice, differently.
    """
    from gomodel.api.fields import user_path  # (a key's rules: the paths it names are keys' paths)

    raw = values[0] if len(values) == 1 else _one(values, "X-GoModel-User-Path", "X-GoModel-User-Path")
    try:
        return user_path(raw.decode("utf-8"))
    except (UnicodeDecodeError, InvalidRequest):
        raise InvalidRequest("X-GoModel-User-Path must be a user path like '/team/alpha': '/'-separated "
                             "segments, none '.' or '..', without ':'.",
                             param="X-GoModel-User-Path", code="invalid_user_path") from None


def presented_key(request, required=True) -> bytes:
    """The key a client sent (C{Authorization: Bearer} or C{x-api-key}), as bytes.

    @raise AuthenticationFailed: none was sent (when C{required}), or the header is malformed.
    @raise InvalidRequest: the header read was sent more than once, with different values
        (C{duplicate_header}): which one counts would be a guess.
    """
    headers = plain_headers(request.requestHeaders)
    values = headers.get(AUTHORIZATION)
    header = (values[0] if len(values) == 1 else _one(values, "Authorization")) if values else None
    if not header:
        values = headers.get(X_API_KEY)
        key = (values[0] if len(values) == 1 else _one(values, "x-api-key")) if values else None
        if key and key.strip():
            return key.strip()
        if not required:
            return b""
        raise AuthenticationFailed("Missing API key: send the gateway key as 'Authorization: Bearer <key>' "
                                   "or 'x-api-key: <key>'.")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise AuthenticationFailed("Invalid authorization header: expected 'Authorization: Bearer <key>'.")
    return token.strip()


def _one(values, name, param=None) -> bytes:
    """The one value of a header sent more than once; L{InvalidRequest} (naming C{param}) when its values
    differ."""
    if any(value != values[0] for value in values):
        raise InvalidRequest(f"The '{name}' header was sent more than once, with different values: "
                             f"send {'the key' if param is None else 'it'} once.", param=param,
                             code="duplicate_header")
    return values[0]


def new_secret() -> str:
    """A fresh managed key secret: C{sk_gom_} and 32 random bytes in hex."""
    return SECRET_PREFIX + os.urandom(32).hex()


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex (secrets are random: no slow KDF is needed)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def redact(secret: str) -> str:
    """C{sk_gom_...abcd}: what lists show of a secret."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"
