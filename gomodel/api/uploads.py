"""Multipart uploads parsed while they arrive: the file part goes to the blob store, memory stays bounded.

An L{UploadSink} stands in for C{request.content} of C{POST /v1/files}: the
listening side (L{gomodel.http.site.GatewayRequest}) hands it every body chunk
as it is received, a streaming multipart parser (the C{multipart} package's
L{PushMultipartParser}) splits the parts, the file part goes to an
L{IBlobWriter} in chunks of about C{WRITE_CHUNK} bytes and the small fields
are kept. The writes run off the reactor (the blob store's threads); while
more than C{WRITE_BOUND} bytes wait for the disk, the connection's reading
is paused, so a slow disk slows the client instead of filling memory (and
the time paused is not counted against the body's deadline: it is the
gateway's, not the client's; L{gomodel.http.site.GatewaySite.sweep_idle}).
Nothing ever holds the whole body: not Twisted (no temporary copy, no form
parsing) and not us.
"""

import os
import re
from urllib.parse import unquote

import multipart  # (the gomodel command loads it on first use: gomodel.lean)
from twisted.internet.defer import Deferred, succeed

from gomodel.errors import InvalidRequest, RequestTooLarge, StorageUnavailable, shown

UPLOAD_PATHS = (b"/v1/files", b"/v1/files/")  # where C{POST} is an upload
FIELD_LIMIT = 64 * 1024  # bytes of one non-file field
OVERHEAD = 1024 * 1024  # bytes of multipart framing and fields allowed besides the file
MAX_PARTS = 32
WRITE_CHUNK = 64 * 1024  # bytes handed to the blob writer at a time
WRITE_BOUND = 4 * WRITE_CHUNK  # bytes waiting for the disk before reading is paused
# A Content-Disposition's filename* (RFC 5987: charset'language'percent-encoded), and the charsets it must take
_FILENAME_STAR = re.compile(r"""(?:^|;)\s*filename\*\s*=\s*"?([^;"]*)""", re.IGNORECASE)
_FILENAME_CHARSETS = ("utf-8", "iso-8859-1")


def filename_star(segment):
    """The C{filename*} of a part's Content-Disposition (RFC 5987's C{charset'language'percent-encoded}), or None
    without one that is UTF-8 or ISO-8859-1. It names the file when present: .NET's HttpClient (the OpenAI .NET
    SDK's uploads) sends it beside a C{filename} that it MIME-encodes (C{=?utf-8?B?...?=}), older clients alone.
    """
    for name, value in segment.headerlist:
        if name == "Content-Disposition" and "filename*" in value.lower():
            found = _FILENAME_STAR.search(value)
            charset, _, rest = found[1].strip().partition("'") if found else ("", "", "")
            _, quote, encoded = rest.partition("'")
            if quote and charset.lower() in _FILENAME_CHARSETS:
                try:
                    return unquote(encoded, encoding=charset, errors="strict")
                except UnicodeDecodeError:
                    return None
    return None


def _text(header_value: str) -> str:
    """A part's header value read as ISO-8859-1 (every byte one character), as UTF-8 where its bytes are that
    (RFC 7578's, what browsers and SDKs send), else as it is (an older client's ISO-8859-1)."""
    try:
        return header_value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return header_value


def field_text(segment, data: bytes) -> str:
    """The text of a form field's part (its L{MultipartSegment} C{segment}, its bytes C{data}): UTF-8, or the
    charset its part names.

    @raise InvalidRequest: it is not valid in that charset (naming it), or its charset is none known.
    """
    charset = segment.charset or "UTF-8"
    try:
        return data.decode(charset)
    except UnicodeError:  # (UnicodeDecodeError; some codecs', punycode's, only UnicodeError)
        raise InvalidRequest(f"The form field '{segment.name}' is not valid {shown(charset)}.", param=segment.name,
                             code="invalid_value") from None
    except LookupError:
        raise InvalidRequest(f"The form field '{segment.name}' names a charset the gateway does not know "
                             f"({shown(charset)}): send it as UTF-8.", param=segment.name,
                             code="invalid_value") from None


class UploadSink:
    """A write-only body sink that parses C{multipart/form-data} as it comes.

    After the body was received, L{finish} fails with the error to answer
    with (400 for a malformed body, 413 past the limit, 503 when the disk
    failed); then L{fields}, L{filename} and L{size} say what was uploaded
    and L{commit} stores the file's contents. L{discard} removes them unless
    they were committed.
    """

    def __init__(self, blobs, max_file_bytes: int, content_type, content_length=None, reader=None):
        """
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} the file part goes to.
        @param reader: what reads the body, paused (C{pause_reading()}) while the disk lags and resumed
            (C{resume_reading()}): the connection, a L{gomodel.http.channel.GatewayChannel}, which does not
            count the time paused against the body's deadline (None: no backpressure).
        """
        self.fields = {}
        self.filename = None
        self.size = 0
        self.error = None
        self._blobs = blobs
        self._reader = reader
        self._paused = False
        self._max_file_bytes = max_file_bytes
        self._max_body = max_file_bytes + OVERHEAD
        self._received = 0
        self._writer = None  # the file part's IBlobWriter, until committed or discarded
        self._has_file = False
        self._buffer = bytearray()  # file bytes not handed to the writer yet
        self._outstanding = 0  # bytes handed to the writer and not written yet
        self._drained = []  # Deferreds waiting for _outstanding to reach 0
        self._discarding = succeed(None)  # the abort of the file part's writes, once discarded
        self._segment = None  # the part being received
        self._field = None  # bytearray of the field being received
        self._files = 0
        self._parser = None
        self._finished = False
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        kind, options = multipart.parse_options_header(content_type or "")
        if kind != "multipart/form-data" or not options.get("boundary"):
            self._fail(InvalidRequest("Uploads must be multipart/form-data with the fields 'file' and 'purpose'.",
                                      code="invalid_content_type"))
        elif content_length is not None and content_length > self._max_body:
            self._too_large()
        else:
            try:
                # (ISO-8859-1 reads any header bytes: a file name is then read as UTF-8 where it is that, L{_text})
                self._parser = multipart.PushMultipartParser(options["boundary"], max_segment_count=MAX_PARTS,
                                                             header_charset="latin-1")
            except multipart.MultipartError as e:
                self._fail(InvalidRequest(f"The multipart body cannot be parsed: {e}.", code="invalid_multipart"))

    # -- the body, as Twisted delivers it ---------------------------------------

    def write(self, data: bytes):
        self._received += len(data)
        if self.error is not None:
            return
        if self._received > self._max_body:
            self._too_large()
            return
        try:
            for event in self._parser.parse(data):
                if isinstance(event, multipart.MultipartSegment):
                    self._start_part(event)
                elif event is None:
                    self._end_part()
                else:
                    self._part_data(event)
                if self.error is not None:
                    return
        except multipart.MultipartError as e:
            self._fail(InvalidRequest(f"The multipart body cannot be parsed: {e}.", code="invalid_multipart"))

    # Twisted treats request.content as a file: it asks for its position and
    # rewinds it once the body is complete. There is nothing to read back.
    def tell(self):
        return self._received

    def seek(self, *args):
        return 0

    def read(self, *args):
        return b""

    def close(self):
        self.discard()

    # -- parts ------------------------------------------------------------------

    def _start_part(self, segment):
        self._segment = segment
        if segment.name == "file":
            self._files += 1
            if self._files > 1:
                self._fail(InvalidRequest("Send exactly one 'file' part.", param="file", code="invalid_multipart"))
                return
            named = filename_star(segment) or _text(segment.filename or "")
            if "\x00" in named:  # (no store could keep it: PostgreSQL's texts hold no NUL)
                self._fail(InvalidRequest("The file's name must not hold a NUL character.", param="file",
                                          code="invalid_value"))
                return
            self.filename = os.path.basename(named.replace("\\", "/")) or "file"
            self._has_file = True
            self._writer = self._blobs.create()
        else:
            self._field = bytearray()

    def _part_data(self, chunk):
        if self._segment.name == "file":
            self.size += len(chunk)
            if self.size > self._max_file_bytes:
                self._too_large()
                return
            self._buffer += chunk
            if len(self._buffer) >= WRITE_CHUNK:
                self._flush()
        else:
            self._field += chunk
            if len(self._field) > FIELD_LIMIT:
                self._fail(InvalidRequest(f"The form field '{self._segment.name}' is too long.",
                                          param=self._segment.name, code="string_above_max_length"))

    def _end_part(self):
        segment, self._segment = self._segment, None
        if segment.name == "file":
            self._flush()
        else:
            value, self._field = bytes(self._field), None
            try:
                self.fields.setdefault(segment.name, field_text(segment, value))
            except InvalidRequest as e:
                self._fail(e)

    # -- writing, with backpressure ----------------------------------------------------

    def _flush(self):
        if not self._buffer or self._writer is None:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        self._outstanding += len(data)
        d = self._writer.write(data)
        if self._outstanding > WRITE_BOUND and self._reader is not None and not self._paused:
            self._paused = True
            self._reader.pause_reading()
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(len(data),), errbackArgs=(len(data),))

    def _written(self, _, size):
        self._outstanding -= size
        if self._paused and self._outstanding <= WRITE_BOUND // 2:
            self._paused = False
            self._reader.resume_reading()
        if self._outstanding == 0:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def _write_failed(self, failure, size):
        error = failure.value
        if not isinstance(error, StorageUnavailable):
            error = StorageUnavailable(f"The upload could not be stored ({failure.getErrorMessage()}).")
        self._fail(error)
        self._written(None, size)

    def _until_written(self):
        d = Deferred()
        if self._outstanding == 0:
            d.callback(None)
        else:
            self._drained.append(d)
        return d

    def _too_large(self):
        self._fail(RequestTooLarge(
            f"The file is larger than the gateway's limit of {self._max_file_bytes} bytes (FILES_MAX_BYTES)."))

    def _fail(self, error):
        if self.error is None:
            self.error = error
        self._field = None
        self._buffer = bytearray()
        self.discard()

    # -- after the body -----------------------------------------------------------

    async def finish(self):
        """Check the complete body and wait for the file part to be written.

        Fails with the L{GatewayError} to answer with, if any.
        """
        if not self._finished and self.error is None:
            self._finished = True
            try:
                self._parser.close(check_complete=True)
            except multipart.MultipartError as e:
                self._fail(InvalidRequest(f"The multipart body is incomplete: {e}.", code="invalid_multipart"))
        if self.error is None and not self._has_file:
            raise InvalidRequest("The upload has no 'file' part.", param="file", code="missing_required_parameter")
        await self._until_written()
        if self.error is not None:
            raise self.error

    async def commit(self, blob_id) -> int:
        """Make the file part durable as blob C{blob_id}; from now on the caller owns it. Returns its size."""
        writer, self._writer = self._writer, None
        return await writer.commit(blob_id)

    def discard(self) -> Deferred:
        """Remove the file part's contents unless L{commit} took them; fires (never fails) once removed."""
        writer, self._writer = self._writer, None
        if self._paused:  # the rest of the body is read and dropped
            self._paused = False
            self._reader.resume_reading()
        if writer is not None:
            self._discarding = writer.abort()
        return self._discarding


class Form:
    """A C{multipart/form-data} body read whole (an audio request's, within the body limit): its parts in order,
    a field's text by name, and the same form again with some fields set (L{body})."""

    def __init__(self, content_type, body: bytes):
        """
        @raise InvalidRequest: the body is no multipart form (or a malformed one).
        """
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        kind, options = multipart.parse_options_header(content_type or "")
        self._boundary = options.get("boundary")
        if kind != "multipart/form-data" or not self._boundary:
            raise InvalidRequest("The request must be multipart/form-data (a 'file' and a 'model').",
                                 code="invalid_content_type")
        self.parts = []  # [MultipartSegment, bytearray of its contents]
        try:
            parser = multipart.PushMultipartParser(self._boundary, max_segment_count=MAX_PARTS,
                                                   header_charset="latin-1")
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    self.parts.append((event, bytearray()))
                elif event is not None:
                    self.parts[-1][1].extend(event)
            parser.close(check_complete=True)
        except multipart.MultipartError as e:
            raise InvalidRequest(f"The multipart body cannot be parsed: {e}.", code="invalid_multipart") from None

    def field(self, name: str):
        """The text of the first non-file part named C{name}, or None without one.

        @raise InvalidRequest: it is not UTF-8 (nor in the charset its part names), or its charset is none known.
        """
        for segment, data in self.parts:
            if segment.name == name and segment.filename is None:
                return field_text(segment, data)
        return None

    def has(self, name: str) -> bool:
        """Whether the form has a part named C{name} (a file's or a field's)."""
        return any(segment.name == name for segment, _ in self.parts)

    @property
    def content_type(self) -> bytes:
        """The C{Content-Type} of L{body}'s forms (their boundary the request's)."""
        return b'multipart/form-data; boundary="' + self._boundary.encode("latin-1") + b'"'

    def body(self, fields: dict) -> bytes:
        """The form with each of C{fields} (name -> text) in place of the parts of that name (the first's place;
        added at the end where it had none), every other part as it came."""
        boundary = b"--" + self._boundary.encode("latin-1")
        # Joined once: a part's contents (an audio file, up to AUDIO_BODY_SIZE_LIMIT) are copied into the
        # form made and nowhere else on the way.
        out, done = [], set()
        for segment, data in self.parts:
            name = segment.name
            if name in fields and segment.filename is None:
                if name in done:
                    continue
                done.add(name)
                out += (boundary, b"\r\n", _field_part(name, fields[name]), b"\r\n")
                continue
            head = "".join(f"{key}: {value}\r\n" for key, value in segment.headerlist).encode("latin-1")
            out += (boundary, b"\r\n", head, b"\r\n", data, b"\r\n")
        for name, value in fields.items():
            if name not in done:
                out += (boundary, b"\r\n", _field_part(name, value), b"\r\n")
        out += (boundary, b"--\r\n")
        return b"".join(out)


def _field_part(name: str, value: str) -> bytes:
    """A multipart part holding the text field C{name} (its head and contents, without the boundary)."""
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'Content-Disposition: form-data; name="{quoted}"\r\n\r\n'.encode() + value.encode()
