"""Multipart uploads parsed while they arrive: the file part goes to disk, memory stays bounded.

An L{UploadSink} stands in for C{request.content} of C{POST /v1/files}: the
listening side (L{gomodel.http.site.GatewayRequest}) hands it every body chunk
as it is received, a streaming multipart parser (the C{multipart} package's
L{PushMultipartParser}) splits the parts, the file part is written to a spool
file in small chunks and the small fields are kept. Nothing ever holds the
whole body: not Twisted (no temporary copy, no form parsing) and not us.
"""

import os
import uuid

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from gomodel.errors import InvalidRequest, RequestTooLarge, StorageUnavailable

FIELD_LIMIT = 64 * 1024  # bytes of one non-file field
OVERHEAD = 1024 * 1024  # bytes of multipart framing and fields allowed besides the file
MAX_PARTS = 32


class UploadSink:
    """A write-only body sink that parses C{multipart/form-data} as it comes.

    After the body was received, L{finish} raises the error to answer with
    (400 for a malformed body, 413 past the limit); then L{fields},
    L{filename}, L{size} and L{take} give what was uploaded. L{discard}
    removes the spooled file unless it was taken.
    """

    def __init__(self, spool_dir: str, max_file_bytes: int, content_type, content_length=None):
        self.fields = {}
        self.filename = None
        self.size = 0
        self.error = None
        self._spool_dir = spool_dir
        self._max_file_bytes = max_file_bytes
        self._max_body = max_file_bytes + OVERHEAD
        self._received = 0
        self._path = None
        self._handle = None
        self._segment = None  # the part being received
        self._field = None  # bytearray of the field being received
        self._files = 0
        self._parser = None
        self._finished = False
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        kind, options = parse_options_header(content_type or "")
        if kind != "multipart/form-data" or not options.get("boundary"):
            self._fail(InvalidRequest("Uploads must be multipart/form-data with the fields 'file' and 'purpose'.",
                                      code="invalid_content_type"))
        elif content_length is not None and content_length > self._max_body:
            self._too_large()
        else:
            try:
                self._parser = PushMultipartParser(options["boundary"], max_segment_count=MAX_PARTS)
            except MultipartError as e:
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
                if isinstance(event, MultipartSegment):
                    self._start_part(event)
                elif event is None:
                    self._end_part()
                else:
                    self._part_data(event)
                if self.error is not None:
                    return
        except MultipartError as e:
            self._fail(InvalidRequest(f"The multipart body cannot be parsed: {e}.", code="invalid_multipart"))
        except OSError as e:
            self._fail(StorageUnavailable(f"The upload could not be stored ({e.strerror})."))

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
                self._fail(InvalidRequest("Send exactly one 'file' part.", param="file"))
                return
            self.filename = os.path.basename((segment.filename or "").replace("\\", "/")) or "file"
            os.makedirs(self._spool_dir, exist_ok=True)
            self._path = os.path.join(self._spool_dir, f"upload-{uuid.uuid4().hex}.part")
            self._handle = open(self._path, "xb")
        else:
            self._field = bytearray()

    def _part_data(self, chunk):
        if self._segment.name == "file":
            self.size += len(chunk)
            if self.size > self._max_file_bytes:
                self._too_large()
                return
            self._handle.write(chunk)
        else:
            self._field += chunk
            if len(self._field) > FIELD_LIMIT:
                self._fail(InvalidRequest(f"The form field '{self._segment.name}' is too long.",
                                          param=self._segment.name))

    def _end_part(self):
        segment, self._segment = self._segment, None
        if segment.name == "file":
            self._handle.close()
            self._handle = None
        else:
            value, self._field = bytes(self._field), None
            try:
                self.fields.setdefault(segment.name, value.decode(segment.charset or "utf-8"))
            except (UnicodeDecodeError, LookupError):
                self._fail(InvalidRequest(f"The form field '{segment.name}' is not valid UTF-8.",
                                          param=segment.name))

    def _too_large(self):
        self._fail(RequestTooLarge(
            f"The file is larger than the gateway's limit of {self._max_file_bytes} bytes (FILES_MAX_BYTES)."))

    def _fail(self, error):
        if self.error is None:
            self.error = error
        self._field = None
        self.discard()

    # -- after the body -----------------------------------------------------------

    def finish(self):
        """Check the complete body; raise the L{GatewayError} to answer with, if any."""
        if not self._finished and self.error is None:
            self._finished = True
            try:
                self._parser.close(check_complete=True)
            except MultipartError as e:
                self._fail(InvalidRequest(f"The multipart body is incomplete: {e}.", code="invalid_multipart"))
        if self.error is not None:
            raise self.error
        if self._path is None:
            raise InvalidRequest("The upload has no 'file' part.", param="file", code="missing_required_parameter")

    def take(self) -> str:
        """The spooled file's path; from now on the caller owns (and removes) it."""
        path, self._path = self._path, None
        return path

    def discard(self):
        """Close and remove the spooled file unless L{take} handed it over."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        path, self._path = self._path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
