"""The standard library's TLS, left out of a gateway that does not use it.

Twisted, treq and asyncio import the standard library's C{ssl} (through
C{http.cookiejar}, C{urllib.request}, C{http.client} and asyncio's event
loop) and C{hashlib} imports OpenSSL's hashes (C{_hashlib}): together they map
libcrypto and libssl into every process, about 4.5 MiB of it resident, for
TLS that the gateway does not do with them (its own TLS, listening or to an
https upstream, is pyOpenSSL's, loaded only where configured). Each of those
modules takes C{ssl}, or C{_hashlib}, as optional: without it, they leave
HTTPS out (C{http.client}, C{urllib.request}, asyncio) or use Python's own
hashes (C{hashlib}, C{hmac}: the same digests, in C too).

L{leave_tls_out} makes those imports, and only those, fail; any other importer
(redis-py for C{rediss://}, OpenTelemetry's exporter for an C{https}
collector, a test) gets the real module, which then loads as usual. The
C{gomodel} command (and its workers, and C{twistd -n gomodel} after a plugin
scan, which hands over to it) calls it before Twisted is imported; a process
that imported C{ssl} already is left as it is. prometheus_client alone
needs C{ssl} at import (its push gateway's and TLS exporter's defaults,
never used here): it is imported under L{tls_stub}.

Measured on the gateway at start (C{PYTHONOPTIMIZE=2}, CPython 3.11): 43.3 MiB resident with them, 38.8
without (libcrypto alone 3.5 MiB of the file-backed pages).

L{load_rare_modules_on_use} makes a few modules that Twisted and
prometheus_client import for paths the gateway never takes (twistd's
debugger, a pseudo-terminal, gzip'd scrapes, jelly's decimals, mime types)
load on their first use instead (Python's C{importlib.util.LazyLoader}):
about 1 MiB less per process. L{import_defer_without_asyncio} imports Twisted's C{defer} with a
stand-in for the three names it takes of asyncio: 1.5 MiB less (38.3 -> 36.8 MiB at start).
L{import_html_without_entities} imports C{html} (for its C{escape}) without its table of named character
references, read on first use: 0.4 MiB less. L{package_without_init} makes prometheus_client's package
without its C{__init__}, which imports its HTTP servers and push clients: 0.5 MiB less.
L{leave_cookiejar_out} leaves out C{http.cookiejar} and what it imports, L{leave_zipfile_out} C{zipfile},
L{leave_http_servers_out} the HTTP servers prometheus_client's text format brings (2 MiB at a plain scrape),
L{leave_templates_out} Twisted's templates from Klein's routes (1.3 MiB after an admin request),
L{leave_hyperlink_out} hyperlink and idna from them, L{leave_markupsafe_out} markupsafe and L{leave_pprint_out}
pprint from werkzeug,
L{leave_perspective_broker_out} Perspective Broker from Twisted's web server, L{leave_credentials_out} Twisted's
credentials from its web interfaces.

Nothing here imports Twisted.
"""

import collections.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from contextlib import ExitStack, contextmanager
from functools import partial

# The modules left out, and the importers that take them as optional.
_LEFT_OUT = frozenset({"ssl", "_ssl", "_hashlib"})
_OPTIONAL_FOR = frozenset({"http.client", "urllib.request", "asyncio.base_events", "asyncio.sslproto",
                           "asyncio.selector_events", "hashlib", "hmac", "werkzeug.serving"})
_IMPORT_MACHINERY = frozenset({"importlib", "importlib._bootstrap", "importlib._bootstrap_external",
                               "_frozen_importlib", "_frozen_importlib_external"})


class _LeaveOut:
    """A meta path finder: an import of C{ssl}, C{_ssl} or C{_hashlib} by a module that takes it as optional
    fails; any other import of it is left to the other finders."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _LEFT_OUT and _importer() in _OPTIONAL_FOR:
            raise ModuleNotFoundError(f"{name} is left out of this process (gomodel.lean)", name=name)
        return None


def leave_tls_out() -> bool:
    """From now on, the standard library's optional imports of TLS get none (see the module).

    @return: whether it was done: not where C{ssl} or C{_hashlib} was imported already (nothing to save), nor
        where C{GOMODEL_STDLIB_TLS=1} asks to keep them.
    """
    if _LeaveOut in sys.meta_path:
        return True
    if os.environ.get("GOMODEL_STDLIB_TLS") == "1" or not _LEFT_OUT.isdisjoint(sys.modules):
        return False
    sys.meta_path.insert(0, _LeaveOut)
    return True


# Modules loaded on first use, and the importers that use them only on paths the gateway never takes (each
# imports it as a whole, C{import X}, so that nothing is read from it at import). Measured on the gateway at
# start, CPython 3.11: pdb and getpass (twistd's --debug and --euid; pdb brings bdb, cmd, code, pprint) 0.45 MiB,
# decimal (Perspective Broker's jelly, imported by twisted.web.server), pty (twisted.internet.process's
# PTYProcess), gzip (prometheus_client's gzip'd scrapes and push gateway) and mimetypes (http.server's file
# serving, imported by prometheus_client) another 0.6 MiB; twisted.web.util (the web server's HTML error and
# redirect pages, which the gateway never answers with: Twisted's templates, xml.sax, pyexpat, urlpath and
# hyperlink come with it) 1.9 MiB; multipart (uploads' and audio's form parser) 0.15 MiB; http.cookiejar (Twisted's
# compat names it a deprecated alias) with L{leave_cookiejar_out}; ipaddress (urllib.parse checks a bracketed host
# with it, which the gateway's own URLs never have: its configuration checks its IPv6 hosts itself) 0.2 MiB;
# urllib.request (xml.sax.saxutils opens a template's system id with it: Twisted's templates, which parse one at
# import, a string, where they are imported) with http.client and the email parser, 0.6 MiB. After an admin request,
# werkzeug's (Klein's routing): difflib (a routing BuildError's suggestion), mimetypes (send_file's guess of a type;
# its FileStorage's with L{leave_mimetypes_out}), pkgutil (find_modules) and secrets (gen_salt), 0.3 MiB. (On CPython
# 3.11 a second import statement of a module on first use loads it: it reads the module's C{__spec__}.) At start, bz2
# and lzma (shutil checks that they import, for its archives; Twisted's web server imports it through tempfile), with
# their C modules and libbz2 and liblzma, 0.3 MiB. And stringprep (the idna codec's, for a label that is not ASCII:
# werkzeug's routing encodes each request's host with it; L{leave_unicodedata_out}).
_RARE = {"pdb": ("twisted.application.app",), "getpass": ("twisted.application.app",),
         "decimal": ("twisted.spread.jelly",), "pty": ("twisted.internet.process",),
         "gzip": ("prometheus_client.exposition",),
         "mimetypes": ("http.server", "werkzeug.utils"),
         "twisted.web.util": ("twisted.web.server",), "multipart": ("gomodel.api.uploads",),
         "http.cookiejar": ("twisted.python.compat",), "ipaddress": ("urllib.parse",),
         "urllib.request": ("xml.sax.saxutils",), "difflib": ("werkzeug.routing.exceptions",),
         "pkgutil": ("werkzeug.utils",), "secrets": ("werkzeug.security",), "bz2": ("shutil",), "lzma": ("shutil",),
         "stringprep": ("encodings.idna",)}
_LAZY = importlib.util._LazyModule  # (the type of a module made by a LazyLoader, not loaded yet)


class _OnFirstUse:
    """A meta path finder: a module of L{_RARE} imported by its importer there is made by a C{LazyLoader}
    (executed when an attribute of it is first read); any other import of it is left to the other finders."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _RARE or _importer() not in _RARE[name]:
            return None
        spec = importlib.util.find_spec(name)  # (this finder gives None for it there: the importer is importlib)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def load_rare_modules_on_use() -> bool:
    """From now on, the modules of L{_RARE} imported by those importers load on their first use (see the
    module); return whether it was done (not where C{GOMODEL_EAGER_IMPORTS=1} asks for Python's usual way)."""
    if _OnFirstUse in sys.meta_path:
        return True
    if os.environ.get("GOMODEL_EAGER_IMPORTS") == "1":
        return False
    sys.meta_path.insert(0, _OnFirstUse)
    return True


def import_defer_without_asyncio() -> bool:
    """Import Twisted's C{defer} with a stand-in for the C{asyncio} it imports three names of (see the
    module): C{iscoroutine}, the same test as asyncio's on CPython 3.11 (L{_iscoroutine}), and
    C{AbstractEventLoop} and C{Future}, which C{defer} names in annotations only (strings: its
    C{from __future__ import annotations}). Any other name read of the stand-in, by any importer,
    loads the real C{asyncio} and answers from it; once C{defer} is imported, the next C{import asyncio}
    gets the real module, loaded then.

    @return: whether it was done: not where C{asyncio} or C{defer} is loaded already (nothing to save),
        not on another Python than 3.11 (asyncio's test differs), not where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    if ("asyncio" in sys.modules or "twisted.internet.defer" in sys.modules or sys.version_info[:2] != (3, 11)
            or os.environ.get("GOMODEL_EAGER_IMPORTS") == "1"):
        return False
    with _beside(_stand_in("asyncio", iscoroutine=_iscoroutine, AbstractEventLoop=_Placeholder, Future=_Placeholder)):
        importlib.import_module("twisted.internet.defer")
    return True


def import_html_without_entities() -> bool:
    """Import C{html} (Twisted's compat and web server take its C{escape}) with a
    stand-in for the C{html.entities} it takes one name of, C{html5}: HTML5's 2,231 named character references
    (about 0.33 MiB of strings), which only C{html.unescape} reads (the gateway never calls it). The stand-in's
    C{html5} is a mapping that loads the real one on its first read (L{_MappingOnRead}); the next
    C{import html.entities} gets the real module.

    @return: whether it was done: not where C{html} or C{html.entities} is loaded already (nothing to save), nor
        where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    if "html" in sys.modules or "html.entities" in sys.modules or os.environ.get("GOMODEL_EAGER_IMPORTS") == "1":
        return False
    with _beside(_stand_in("html.entities", html5=_MappingOnRead("html.entities", "html5"))):
        importlib.import_module("html")
    return True


def leave_cookiejar_out() -> bool:
    """From now on, Twisted's C{web.client} (the gateway's HTTP client) is imported with a stand-in for
    C{http.cookiejar}, whose one name it takes, C{CookieJar}, it names in annotations only (strings: its
    C{from __future__ import annotations}): the real module imports C{urllib.request}, C{http.client} and the C{email}
    parser (about 0.7 MiB) for cookies the gateway never keeps. With L{load_rare_modules_on_use}, Twisted's compat,
    the one other importer (a deprecated alias), gets it loaded on first use. The next C{import http.cookiejar} gets
    the real module (any other name read of the stand-in too). The client is imported where it is (after
    L{gomodel.tap} has kept OpenSSL out where no TLS is configured: its endpoints import it), not here.

    @return: whether it was done: not where C{http.cookiejar} is loaded already (a module on first use is not), nor
        where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("twisted.web.client", "http.cookiejar", CookieJar=_Placeholder)


def leave_zipfile_out() -> bool:
    """From now on, Twisted's C{python.modules} (its plugin system's module walk: twistd's and the C{--listen}
    parser's plugins) is imported with a stand-in for C{twisted.python.zippath}, whose one name it takes,
    C{ZipArchive}, it calls for a zip archive on the path only (none here): the real module imports C{zipfile}
    (about 0.25 MiB). The stand-in's C{ZipArchive} loads it on its first call and answers from it.

    @return: whether it was done: not where C{twisted.python.zippath} is loaded already, nor where
        C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("twisted.python.modules", "twisted.python.zippath",
                          ZipArchive=partial(_call_real, "twisted.python.zippath", "ZipArchive"))


def leave_http_servers_out() -> bool:
    """From now on, prometheus_client's C{exposition} (its Prometheus text format's C{generate_latest}, loaded at the
    first plain scrape of C{/metrics}: L{gomodel.accounting.metrics.GatewayMetrics.page}) is imported with stand-ins
    for the standard library's HTTP and WSGI servers (C{http.server}, C{socketserver}, C{wsgiref.simple_server}) and
    HTTP client (C{urllib.request}), which it subclasses and calls for its own metrics server and push gateway
    client only (C{start_http_server}, C{MetricsHandler}, C{push_to_gateway}), never run here: the real ones import
    C{http.client}, C{email}'s parser and C{wsgiref}'s handlers (about 2 MiB). Its classes built on them, and their
    functions, refuse to be used (L{_left_out_class}); the next C{import http.server} (or of the others) gets the
    real module. Where one of them is loaded already, the real one is used.

    @return: whether it was done: not where all of them are loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("prometheus_client.exposition", {
        "http.server": {"BaseHTTPRequestHandler": _left_out_class("http.server", "BaseHTTPRequestHandler")},
        "socketserver": {"ThreadingMixIn": _left_out_class("socketserver", "ThreadingMixIn")},
        "urllib.request": {name: _left_out_class("urllib.request", name) for name in (
            "BaseHandler", "HTTPHandler", "HTTPRedirectHandler", "HTTPSHandler", "Request")} | {
            "build_opener": partial(_left_out, "urllib.request", "build_opener")},
        "wsgiref.simple_server": {"make_server": partial(_left_out, "wsgiref.simple_server", "make_server"),
                                  "WSGIRequestHandler": _left_out_class("wsgiref.simple_server", "WSGIRequestHandler"),
                                  "WSGIServer": _left_out_class("wsgiref.simple_server", "WSGIServer")}})


def leave_templates_out() -> bool:
    """From now on, Klein's app and resource modules (its routes: L{gomodel.build}'s Klein routes, with
    L{package_without_init}'s C{klein}) are imported with a stand-in for Twisted's templates
    (C{twisted.web.template}), whose names they take for Klein's renderables: C{Tag}, which its app names in
    a type alias only, and C{renderElement}, which its resource calls for a route's answer that is an
    C{IRenderable} (the gateway's never are): the stand-in's loads the real one on its first call. The real
    templates import C{xml.sax}, C{pyexpat}, C{twisted.python.urlpath} and parse one at import (about 1.5 MiB).
    The next C{import twisted.web.template} gets the real module (any other name read of the stand-in too).

    @return: whether it was done: not where C{twisted.web.template} is loaded already, nor where
        C{GOMODEL_EAGER_IMPORTS=1}.
    """
    names = {"Tag": _Placeholder, "renderElement": partial(_call_real, "twisted.web.template", "renderElement")}
    # (one stand-in for both: the app imports the resource while its own is there)
    return all([_import_beside(importee, "twisted.web.template", **names) for importee in ("klein._app", "klein._resource")])


def leave_perspective_broker_out() -> bool:
    """From now on, Twisted's web server (C{twisted.web.server}: the gateway's) is imported with a stand-in for
    Perspective Broker (C{twisted.spread.pb}), whose two names it takes for its C{Request}, C{Copyable} (a base class)
    and C{ViewPoint} (a request's copy for a PB client calls it, never here), both the real ones: C{pb} takes them from
    C{twisted.spread.flavors} too (L{_NameOf}). The real module imports banana, Twisted's portals and its own
    protocol, never used here (about 0.2 MiB at start). The next C{import twisted.spread.pb} gets the real module.

    @return: whether it was done: not where C{twisted.spread.pb} is loaded already, nor where
        C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("twisted.web.server", "twisted.spread.pb",
                          Copyable=_NameOf("twisted.spread.flavors", "Copyable"),
                          ViewPoint=_NameOf("twisted.spread.flavors", "ViewPoint"))


def leave_credentials_out() -> bool:
    """From now on, Twisted's web interfaces (C{twisted.web.iweb}: its web server's and client's) are imported with a
    stand-in for Twisted's credentials (C{twisted.cred.credentials}), whose one name it takes, C{IUsernameDigestHash},
    it names in no code (its HTTP digest authentication, never used here, is C{twisted.web._auth}'s): the stand-in's is
    a class whose any name read or call answers from the real interface, loaded then (L{_class_on_use}). The real
    module imports Twisted's digest helpers and random bytes (about 0.15 MiB at start). The next
    C{import twisted.cred.credentials} gets the real module.

    @return: whether it was done: not where C{twisted.cred.credentials} is loaded already, nor where
        C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("twisted.web.iweb", "twisted.cred.credentials",
                          IUsernameDigestHash=_class_on_use("twisted.cred.credentials", "IUsernameDigestHash"))


def leave_zlib_out() -> bool:
    """From now on, the modules that import C{zlib} for what the gateway never does are imported with a stand-in
    for it, whose any name read loads the real module and answers from it: C{shutil} (which checks that it imports,
    for its archives), Twisted's web server (its gzip encoding of an answer, never asked for here) and web client
    (its C{ContentDecoderAgent}, not used: L{gomodel.proxy.exchange} decodes an upstream's compressed answer itself,
    importing C{zlib} then), and werkzeug's utils (Klein's routing: C{adler32}, for C{send_file}'s ETag, loads it on
    its first call). The real module maps libz (about 0.3 MiB). The next C{import zlib} gets the real module.

    @return: whether it was done: not where C{zlib} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return all([_import_beside("shutil", "zlib"), _import_beside("twisted.web.server", "zlib"),
                _import_beside("twisted.web.client", "zlib"),
                _import_beside("werkzeug.utils", "zlib", adler32=partial(_call_real, "zlib", "adler32"))])


def leave_unicodedata_out() -> bool:
    """From now on, the modules that import C{unicodedata} for a name or text the gateway never has (not ASCII)
    are imported with a stand-in for it, whose any name read loads the real module and answers from it: attrs'
    C{_make} (C{normalize}s a field's name given by C{make_class}), Twisted's endpoints (C{normalize}, a host name
    that is not ASCII: its C{normalize} loads it on its first call) and werkzeug's utils (Klein's routing:
    C{secure_filename}, C{send_file}), and the C{idna} codec (werkzeug's routing encodes the request's host with it,
    at each request for Klein's routes), which reads its C{ucd_3_2_0} for a label that is not ASCII only: the
    stand-in's is a class whose any name read is the real one's (L{_class_on_use}); with
    L{load_rare_modules_on_use}, its C{stringprep}, which imports it, loads on first use. The real module's
    database is about 0.3 MiB. The next C{import unicodedata} gets the real module.

    @return: whether it was done: not where C{unicodedata} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return all([_import_beside("attr._make", "unicodedata"),
                _import_beside("encodings.idna", "unicodedata", ucd_3_2_0=_class_on_use("unicodedata", "ucd_3_2_0")),
                _import_beside("twisted.internet.endpoints", "unicodedata",
                               normalize=partial(_call_real, "unicodedata", "normalize")),
                _import_beside("werkzeug.utils", "unicodedata")])


def leave_email_out() -> bool:
    """From now on, Twisted's HTTP (C{twisted.web.http}: its server's requests) is imported with stand-ins for the
    C{email} package and its C{message}, whose C{message_from_bytes}, C{EmailMessage} and C{Message} it calls to
    decode a form's body and its Content-Type, which the gateway turns off (L{gomodel.http.site}: it reads its forms
    with C{multipart}): they load the real ones on their first call (L{_class_on_use} for the classes). The real
    package imports its header, charset, quoted-printable and address modules and C{calendar} (about 0.45 MiB). The
    next C{import email} (or of its C{message}) gets the real module.

    @return: whether it was done: not where both are loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("twisted.web.http", {
        "email": {"message_from_bytes": partial(_call_real, "email", "message_from_bytes")},
        "email.message": {"EmailMessage": _class_on_use("email.message", "EmailMessage"),
                          "Message": _class_on_use("email.message", "Message")}})


class _NameOf:
    """A stand-in's name that is the real C{module}'s C{name}, read when the stand-in is made (while its importer
    is imported: L{_stand_in})."""

    def __init__(self, module, name):
        self.module, self.name = module, name


def leave_markupsafe_out() -> bool:
    """From now on, werkzeug's exceptions and utils (Klein's routing imports them) are imported with a stand-in for
    C{markupsafe}, whose C{escape} and C{Markup} they call for their own HTML pages only (an error's body, a redirect's;
    never here: the gateway answers Klein's routing errors itself, L{gomodel.http.render.install}): the stand-in's
    load the real ones on their first call (L{_class_on_use} for the class). The real module imports its C speedups
    (about 0.15 MiB). The next C{import markupsafe} gets the real module.

    @return: whether it was done: not where C{markupsafe} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    names = {"escape": partial(_call_real, "markupsafe", "escape"), "Markup": _class_on_use("markupsafe", "Markup")}
    # (one stand-in for both: utils imports exceptions while its own is there)
    return all([_import_beside(importee, "markupsafe", **names) for importee in ("werkzeug.utils", "werkzeug.exceptions")])


def leave_pprint_out() -> bool:
    """From now on, werkzeug's routing map (Klein's routes) is imported with a stand-in C{pprint}, whose C{pformat} it
    calls for a map's C{repr} only (never here): the stand-in's loads the real one on its first call. The next
    C{import pprint} gets the real module.

    @return: whether it was done: not where C{pprint} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("werkzeug.routing.map", "pprint", pformat=partial(_call_real, "pprint", "pformat"))


def leave_mimetypes_out() -> bool:
    """From now on, werkzeug's C{FileStorage} module (imported with its routing: Klein's routes) is imported with a
    stand-in C{mimetypes} (its second importer, after C{werkzeug.utils}, which gets it loaded on first use: see
    L{_RARE}), whose any name read (C{guess_type}, for an uploaded file's type, never here: the gateway reads its
    forms with C{multipart}) loads the real module and answers from it.

    @return: whether it was done: not where C{mimetypes} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("werkzeug.datastructures.file_storage", "mimetypes")


def leave_hyperlink_out() -> bool:
    """From now on, Klein's dependency-injected request metadata (C{klein._dihttp}, which its resource imports for its
    C{Response}) is imported with a stand-in for C{hyperlink}, whose C{DecodedURL} it names in annotations and casts
    and calls for its C{Requirer}'s C{RequestURL} only (never here): the stand-in's C{DecodedURL} is a class whose any
    name read or call loads the real one and answers from it (L{_class_on_use}). The real module imports C{idna} and
    its tables (about 0.8 MiB). The next C{import hyperlink} gets the real module.

    @return: whether it was done: not where C{hyperlink} is loaded already, nor where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    return _import_beside("klein._dihttp", "hyperlink", DecodedURL=_class_on_use("hyperlink", "DecodedURL"))


def leave_werkzeug_http_out() -> bool:
    """From now on, werkzeug's data structures and headers and its sans-IO utils (Klein's routing imports them) are
    imported with a stand-in for werkzeug's C{http}, whose functions they call to quote, dump and parse header values
    only (never here: Klein's routing reads none): the stand-in's any name read (the utils' C{parse_set_header},
    called) loads the real module and answers from it. The real module imports its sans-IO C{http}, the C{email}
    package's C{utils} (its dates) and their own imports (about 0.35 MiB after an admin request). The next
    C{import werkzeug.http} gets the real module.

    @return: whether it was done: not where werkzeug's C{http} is loaded already, nor where
        C{GOMODEL_EAGER_IMPORTS=1}.
    """
    # (one stand-in for the three: the structures import the headers while its own is there)
    return all([_import_beside("werkzeug.datastructures.structures", "werkzeug.http"),
                _import_beside("werkzeug.datastructures.headers", "werkzeug.http"),
                _import_beside("werkzeug.sansio.utils", "werkzeug.http",
                               parse_set_header=partial(_call_real, "werkzeug.http", "parse_set_header"))])


class _OnUse(type):
    """The type of a stand-in for a class (L{_class_on_use}): a name read of it (but its own dunder names), or a
    call, is the real class's, loaded then."""

    def __getattr__(cls, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(cls._real(), attribute)

    def __call__(cls, *args, **kwargs):
        return cls._real()(*args, **kwargs)


def _class_on_use(module, name):
    """A stand-in for C{module}'s class C{name}, for an importer that names it and uses it rarely."""
    real = staticmethod(partial(_real_name, module, name))
    return _OnUse(name, (), {"_real": real, "__doc__": f"A stand-in for {module}.{name} (gomodel.lean)."})


def _real_name(module, name):
    return getattr(importlib.import_module(module), name)


def _left_out(module, name, *args, **kwargs):
    raise RuntimeError(f"{module}.{name} is left out of this process (gomodel.lean); GOMODEL_EAGER_IMPORTS=1 keeps it")


def _left_out_class(module, name):
    """A class standing in for C{module}'s C{name} as a base class, whose instances (its subclasses') are refused."""
    return type(name, (), {"__new__": lambda cls, *args, **kwargs: _left_out(module, name),
                           "__doc__": f"A stand-in for {module}.{name} (gomodel.lean)."})


def _call_real(module, name, *args, **kwargs):
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


# Modules executed with stand-ins beside them (L{_Beside}): importee -> {the stand-in's module name: its names}.
_BESIDE = {}


def _import_beside(importee, name, **names) -> bool:
    """From now on, C{importee} is executed with a stand-in C{name} (L{_stand_in}) beside it, where the real one is
    not loaded; return whether it was done (not where the real one is, nor where C{GOMODEL_EAGER_IMPORTS=1}).
    C{name} may be a mapping instead, of several stand-ins' module names to their names (each where its real one is
    not loaded; done unless all of them are)."""
    stand_ins = name if isinstance(name, dict) else {name: names}
    if stand_ins.keys() <= _BESIDE.get(importee, {}).keys():
        return True
    if os.environ.get("GOMODEL_EAGER_IMPORTS") == "1" or all(map(_real, stand_ins)):
        return False
    _BESIDE.setdefault(importee, {}).update(stand_ins)  # (beside those another function gave it)
    if _Beside not in sys.meta_path:
        sys.meta_path.insert(0, _Beside)
    return True


def _real(name) -> bool:
    """Whether module C{name} is loaded (a module on first use, not loaded yet, is not)."""
    module = sys.modules.get(name)
    return module is not None and type(module) is not _LAZY


class _Beside:
    """A meta path finder: a module of L{_BESIDE} is executed with its stand-in beside it, where the real one is
    not loaded."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        stand_ins = [_stand_in(stand_in, **names) for stand_in, names in _BESIDE.get(name, {}).items()
                     if not _real(stand_in)]
        if not stand_ins:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ExecBeside(spec.loader, stand_ins)
        return spec


class _ExecBeside:
    """A loader: its module executed by C{loader} with C{stand_ins} beside it (L{_beside}); then the module's
    loader is C{loader}, as if it had loaded it alone."""

    def __init__(self, loader, stand_ins):
        self._loader = loader
        self._stand_ins = stand_ins

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self._loader
        with ExitStack() as beside:
            for stand_in in self._stand_ins:
                beside.enter_context(_beside(stand_in))
            self._loader.exec_module(module)


def _stand_in(name, **names):
    """A module C{name} with C{names}, whose any other name read loads the real module and answers from it."""
    module = types.ModuleType(name, f"A stand-in for {name} while one importer is imported (gomodel.lean).")
    vars(module).update({key: _real_name(value.module, value.name) if isinstance(value, _NameOf) else value
                         for key, value in names.items()})
    module.__getattr__ = partial(_real_attribute, module)
    return module


def _real_attribute(stand_in, attribute):
    """A name read of a stand-in other than its own: the real module's, which it loads. Its own dunder names are
    not there (the import machinery's C{hasattr(module, "__path__")} must not load it)."""
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    if sys.modules.get(stand_in.__name__) is stand_in:
        del sys.modules[stand_in.__name__]
    return getattr(importlib.import_module(stand_in.__name__), attribute)


@contextmanager
def _beside(stand_in):
    """With C{stand_in} in C{sys.modules} under its module's name; then what was there before (nothing, or a module
    loaded on first use) is there again, unless the real one was loaded since."""
    name = stand_in.__name__
    before = sys.modules.get(name)
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            if before is None:
                del sys.modules[name]
            else:
                sys.modules[name] = before



class _MappingOnRead(collections.abc.Mapping):
    """A module's mapping, read-only, loaded with its module on the first read of it."""

    def __init__(self, module, name):
        self._where = (module, name)
        self._loaded = None

    def _mapping(self):
        if self._loaded is None:
            module, name = self._where
            self._loaded = getattr(importlib.import_module(module), name)
        return self._loaded

    def __getitem__(self, key):
        return self._mapping()[key]

    def __contains__(self, key):
        return key in self._mapping()

    def __iter__(self):
        return iter(self._mapping())

    def __len__(self):
        return len(self._mapping())


def package_without_init(name, **names):
    """Make the package C{name} (not imported yet) without running its C{__init__}: its submodules import as
    usual; the first read of any other name of it (C{from name import X}, C{name.X}) runs the C{__init__} then,
    in the same module, and answers from it. prometheus_client's imports its HTTP servers and push clients,
    which the gateway never uses (its C{exposition} module, loaded at the first scrape:
    L{gomodel.accounting.metrics.GatewayMetrics.page}); werkzeug's its development server and test client
    (Klein takes its routing and exceptions only: L{gomodel.build}'s Klein routes). C{names}: names of the package
    read from the submodule that defines them, without the C{__init__} (klein's C{Klein}, from C{klein._app}: its
    C{__init__} imports its forms, sessions and plating, which import Twisted's templates).

    @return: the package's module, from C{sys.modules} where it was imported already, or made as usual (its
        C{__init__} run) where C{GOMODEL_EAGER_IMPORTS=1}.
    """
    if name in sys.modules or os.environ.get("GOMODEL_EAGER_IMPORTS") == "1":
        return importlib.import_module(name)
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)  # (its __path__, __file__, __spec__: its submodules import)

    def init_on_read(attribute):
        if attribute.startswith("__"):  # (the import machinery's probes: no reason to run it)
            raise AttributeError(attribute)
        if attribute in names:
            return getattr(importlib.import_module(names[attribute]), attribute)
        submodule = f"{name}.{attribute}"  # (C{from . import values} in a submodule; a stand-in's: L{_import_beside})
        if submodule in sys.modules or importlib.util.find_spec(submodule) is not None:
            return importlib.import_module(submodule)
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = init_on_read
    sys.modules[name] = package
    return package


# asyncio.coroutines.iscoroutine as CPython 3.11 has it (generators count; a positive type is remembered).
_COROUTINE_TYPES = (types.CoroutineType, types.GeneratorType, collections.abc.Coroutine)
_coroutine_types_seen = set()


def _iscoroutine(obj):
    if type(obj) in _coroutine_types_seen:
        return True
    if isinstance(obj, _COROUTINE_TYPES):
        if len(_coroutine_types_seen) < 100:
            _coroutine_types_seen.add(type(obj))
        return True
    return False


def _importer():
    """The name of the module whose import statement is being carried out (the import machinery's frames
    skipped)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in _IMPORT_MACHINERY:
        frame = frame.f_back
    return None if frame is None else frame.f_globals.get("__name__")


class _Placeholder:
    """What the stub's every name is: a class (annotations subscript it), an int where one is compared."""


def _stub():
    module = types.ModuleType("ssl", "A stand-in for the ssl module while prometheus_client is imported.")
    module.__getattr__ = lambda name: _Placeholder
    module.PROTOCOL_TLS_SERVER, module.PROTOCOL_TLS_CLIENT = 17, 16  # (default arguments' values)
    return module


@contextmanager
def tls_stub():
    """Import under a stand-in C{ssl} where TLS is left out (L{leave_tls_out}) and not loaded, and with a
    stand-in C{urllib.request.HTTPSHandler} where C{urllib.request} has none (it was imported without
    C{ssl}): the module imported keeps them (for functions the gateway never calls); afterwards C{urllib.request}
    is as it was, and the next import of C{ssl} gets the real one. The handler is needed even where the real
    C{ssl} was loaded since (redis-py or psycopg, while the configuration was read): C{urllib.request} was not
    imported again."""
    if _LeaveOut not in sys.meta_path:
        yield
        return
    stub = None if "ssl" in sys.modules else _stub()
    if stub is not None:
        sys.modules["ssl"] = stub
    request = sys.modules.get("urllib.request")
    handler = request is not None and not hasattr(request, "HTTPSHandler")
    if handler:
        request.HTTPSHandler = _Placeholder
    try:
        yield
    finally:
        if handler:
            del request.HTTPSHandler
        if stub is not None and sys.modules.get("ssl") is stub:
            del sys.modules["ssl"]
