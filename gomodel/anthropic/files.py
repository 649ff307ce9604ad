"""Anthropic's Files API (beta C{files-api-2025-04-14}) over the gateway's own files.

The anthropic SDK's C{client.beta.files} calls the same paths as OpenAI's
Files API (C{/v1/files}, C{/v1/files/{id}}, C{/v1/files/{id}/content}) and
sends C{anthropic-version} with every request: such a request gets
Anthropic's shapes (L{file_metadata}, L{files_page}, L{DELETED}) and its error
envelope, over the same store, so one file is seen by both APIs.

An upload has no C{purpose} in Anthropic's API: it is stored as
L{UPLOAD_PURPOSE}. A file's C{mime_type} is told by its name
(L{mime_type}), as the store keeps no type.
"""

from datetime import datetime, timezone

from gomodel.errors import InvalidRequest

# The store's purpose of a file an Anthropic client uploads (OpenAI's for files of any use).
UPLOAD_PURPOSE = "user_data"
# Anthropic's bounds of an upload's expires_in_seconds (an hour to ninety days).
EXPIRES_IN = (3600, 90 * 86400)
# The page size of a list that names none, and the largest (Anthropic's).
LIST_LIMIT, LIST_LIMIT_MAX = 20, 1000
# The most files a list restricted to C{ids} names.
IDS_MAX = 100
# The opaque cursor of Anthropic's C{next_page}: this prefix and the id of the page's last file.
PAGE_PREFIX = "page_"
# Types by extension (not the mimetypes module's: the system's table, and a module the gateway loads only if used).
_TYPES = {"txt": "text/plain", "md": "text/markdown", "csv": "text/csv", "html": "text/html", "htm": "text/html",
          "py": "text/x-python", "js": "text/javascript", "css": "text/css", "tsv": "text/tab-separated-values",
          "yaml": "application/yaml", "yml": "application/yaml", "svg": "image/svg+xml", "zip": "application/zip",
          "json": "application/json", "jsonl": "application/jsonl", "xml": "application/xml",
          "pdf": "application/pdf", "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
          "gif": "image/gif", "webp": "image/webp"}


def wants_anthropic_files(request) -> bool:
    """Whether C{request} comes from an Anthropic client (C{anthropic-version}, or the Files API's beta)."""
    if request.getHeader(b"anthropic-version") is not None:
        return True
    beta = request.getHeader(b"anthropic-beta")
    return beta is not None and b"files-api" in beta


def mime_type(filename) -> str:
    """A file's MIME type by its name's extension; C{application/octet-stream} for one not known."""
    name = filename if isinstance(filename, str) else ""
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    return _TYPES.get(extension, "application/octet-stream")


def _rfc3339(seconds) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_metadata(record) -> dict:
    """Anthropic's file object for a store record (every file the gateway keeps can be downloaded)."""
    metadata = {"type": "file", "id": record["id"], "filename": record["filename"],
                "mime_type": mime_type(record["filename"]), "size_bytes": record["bytes"],
                "created_at": _rfc3339(record["created_at"]), "downloadable": True}
    if record.get("expires_at") is not None:
        metadata["expires_at"] = _rfc3339(record["expires_at"])
    return metadata


def files_page(records, has_more: bool, before: bool = False) -> dict:
    """Anthropic's list page: C{data}, C{first_id}, C{last_id}, C{has_more}, and the newer SDKs' C{next_page}
    (None at the end, and for a page asked C{before} an id: the SDK pages that way by C{first_id})."""
    data = [file_metadata(r) for r in records]
    last = data[-1]["id"] if data else None
    return {"data": data, "first_id": data[0]["id"] if data else None, "last_id": last, "has_more": has_more,
            "next_page": PAGE_PREFIX + last if has_more and last and not before else None}


def page_cursor(after_id, page):
    """The id after which a list starts, from C{after_id} or the C{page} cursor (L{PAGE_PREFIX}), or None.

    @raise InvalidRequest: a C{page} that is no cursor of the gateway's.
    """
    if page is None:
        return after_id
    if not page.startswith(PAGE_PREFIX) or len(page) == len(PAGE_PREFIX):
        raise InvalidRequest("'page' is not a page cursor of this API.", param="page", code="invalid_value")
    return page[len(PAGE_PREFIX):]


def expires_in(fields):
    """The seconds of an upload's C{expires_in_seconds} form field, or None without one.

    @raise InvalidRequest: it is no whole number from an hour to ninety days.
    """
    text = fields.get("expires_in_seconds")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not EXPIRES_IN[0] <= int(text) <= EXPIRES_IN[1]:
        raise InvalidRequest(f"expires_in_seconds must be a whole number from {EXPIRES_IN[0]} to {EXPIRES_IN[1]}.",
                             param="expires_in_seconds", code="invalid_value")
    return int(text)


DELETED = "file_deleted"
