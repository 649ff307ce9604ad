"""The admin dashboard's shell and static assets, read once from the package (at the first request for the page or
an asset) and served from memory.

The shell (C{/admin/dashboard}, and C{/admin/dashboard/<page>} for each of
L{PAGES}, where C{/admin/dashboard/<page>/} redirects) and the assets (C{/admin/static/...}) hold no data and need no key (the shell says whether the gateway is open, with no
master key: C{<html data-open-gateway>}, as anyone can find out there); the
page asks the admin API for everything, with the master key the operator
pasted (kept in the tab's C{sessionStorage}). Every URL of an asset carries C{?v=<version>}, a hash of all the assets' contents,
also written into the ES modules' relative imports: a changed file changes
every URL, so an asset asked for with the current version is cached for a
year and a new release is never mixed with an old one.

Every answer carries a strict Content-Security-Policy (no inline script or
style, nothing from another origin, no framing), C{X-Content-Type-Options:
nosniff} and C{Referrer-Policy: no-referrer}.
"""

import hashlib
import os
import re
from functools import cached_property

from gomodel.errors import NotFound, shown

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The app's pages (app.js's PAGES), each also served at C{/admin/dashboard/<page>} as GoModel's dashboard serves its
# own (bookmarks of them open that page).
PAGES = ("overview", "providers", "usage", "keys", "budgets", "batches")
# (C{/admin/dashboard/<page>/} redirects to its page: L{Dashboard.to_page})
SHELL_PATHS = ("/admin/dashboard", "/admin/dashboard/") + tuple(
    path for page in PAGES for path in (f"/admin/dashboard/{page}", f"/admin/dashboard/{page}/"))
STATIC_PREFIX = "/admin/static/"
SHELL = "index.html"
CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml", ".md": b"text/plain; charset=utf-8",
    ".txt": b"text/plain; charset=utf-8",
}
IMMUTABLE = b"public, max-age=31536000, immutable"
# A relative import of an ES module: `from "./x.js"`, `import "./x.js"`, `import("./x.js")`.
_IMPORT = re.compile(rb"""((?:\bfrom|\bimport)\s*\(?\s*)(["'])(\.{1,2}/[^"'?]+\.js)\2""")


class Dashboard:
    """The shell and the assets of one directory (the package's C{static/}), in memory."""

    def __init__(self, directory=STATIC, open_gateway=False):
        """Serve the files under C{directory}, read at the first request for one of them (not with the admin API's
        routes: about 0.3 MiB a process whose dashboard is never opened).

        @param open_gateway: whether the gateway has no master key (the page then says so, whatever key was typed).
        """
        self._directory = directory
        self._open_gateway = open_gateway

    @cached_property
    def _contents(self):
        """C{(version, shell, assets)}: every file under the directory, read now (once).

        @raise OSError: the directory or the shell (C{index.html}) cannot be read (the request's 500; the next
            reads them again).
        """
        directory, files = self._directory, {}
        for root, dirs, names in os.walk(directory):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, directory).replace(os.sep, "/")] = f.read()
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode("utf-8") + b"\0" + files[name] + b"\0")
        text = digest.hexdigest()[:16]
        version = text.encode("ascii")
        shell = files.pop(SHELL).replace(b"__VERSION__", version).replace(
            b"__OPEN_GATEWAY__", b"true" if self._open_gateway else b"false")
        assets = {}
        for name, content in files.items():
            suffix = os.path.splitext(name)[1]
            if suffix == ".js" and not name.startswith("vendor/"):
                content = _IMPORT.sub(lambda m: m.group(1) + m.group(2) + m.group(3) + b"?v=" + version
                                      + m.group(2), content)
            assets[name] = (content, CONTENT_TYPES.get(suffix, b"application/octet-stream"))
        return text, shell, assets

    @property
    def version(self) -> str:
        """A hash of all the files' contents (every asset URL's C{v})."""
        return self._contents[0]

    @property
    def names(self) -> tuple:
        """The asset names (paths below C{/admin/static/})."""
        return tuple(sorted(self._contents[2]))

    def shell(self, request) -> bytes:
        """The page (C{GET /admin/dashboard}): never cached, so it always names the current assets."""
        shell = self._contents[1]
        _headers(request, CONTENT_TYPES[".html"], b"no-cache", len(shell))
        return shell

    def to_page(self, request, page: str) -> bytes:
        """A 308 from C{/admin/dashboard/<page>/} to C{/admin/dashboard/<page>} (one of L{PAGES}), its query kept:
        the app opens the page its path names, and only the path without the slash."""
        query = request.uri.partition(b"?")[2]
        request.setResponseCode(308)
        request.setHeader(b"location", b"/admin/dashboard/" + page.encode("ascii") + (b"?" + query if query else b""))
        _headers(request, b"text/plain; charset=utf-8", b"no-cache", 0)
        return b""

    def asset(self, request, name: str) -> bytes:
        """One asset (C{GET /admin/static/<name>}): cached for a year when asked for with the current C{v}.

        @raise NotFound: no such asset.
        """
        version, _, assets = self._contents
        found = assets.get(name)
        if found is None:
            raise NotFound(f"No dashboard asset '{shown(name)}'.")
        content, content_type = found
        asked = request.args.get(b"v", [b""])[0]
        _headers(request, content_type, IMMUTABLE if asked == version.encode("ascii") else b"no-cache",
                 len(content))
        return content


def _headers(request, content_type, cache_control, length):
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", cache_control)
    request.setHeader(b"content-length", b"%d" % length)
