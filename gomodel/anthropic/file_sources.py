"""Content blocks that name a file of the gateway's Files API: C{{"source": {"type": "file", "file_id"}}}.

Anthropic's Files API exists to be named that way in a message (an C{image}
or C{document} block, in a message or in a tool result). No upstream has the
gateway's files, so before the request goes anywhere each such source is
replaced by the file's contents, as the client could have sent them: an
image in C{base64} (its type read from its bytes), a PDF (its bytes start with
C{%PDF-}) in C{base64}, any other document as its UTF-8 text (a C{text}
source). What cannot be (no such file for the key, an image that is none, a
file named C{.pdf} that holds no PDF, a file past L{MAX_INLINE}) is a 400
naming the block.
"""

import base64

from gomodel.anthropic.files import mime_type
from gomodel.anthropic.translate import TOOL_CHANGES, blank_block, blank_system, empty_content, refused_image
from gomodel.auth.tenancy import visible
from gomodel.errors import InvalidRequest, shown
from gomodel.ids import held_nowhere
from gomodel.store.records import MESSAGE_BATCH_PURPOSE

# The most bytes of files inlined into a request, and into a message batch (Anthropic's limits on their sizes).
MAX_INLINE = 32 * 1024 * 1024
MAX_BATCH = 256 * 1024 * 1024
# An image's type by its first bytes (Anthropic's four).
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                (b"GIF89a", "image/gif"))
_PDF_MAGIC = b"%PDF-"


def file_blocks(body) -> list:
    """C{(where, block)} for each C{image} or C{document} block of C{body}'s messages (and of their tool results)
    whose source is a file."""
    return walk_blocks(body)[0]


# Blocks that vLLM's Messages API has not (it refuses one in a message, and drops one in a tool result unread).
TRANSLATED_BLOCKS = ("document", "search_result")
# The blocks L{walk_blocks} looks into (those of L{TRANSLATED_BLOCKS}, and those that may name a file).
_LOOKED_AT = ("document", "search_result", "image")  # (a tuple: a type may be unhashable, a list)


def walk_blocks(body, files=True) -> tuple:
    """C{(found, translated, errored)} of the Messages request C{body}, in one walk of its blocks: L{file_blocks}'
    list (with C{files}; else C{[]}), whether its last message is the assistant's (a prefill, which the answer
    continues: vLLM's Messages API, 0.32, closes it as a finished turn and answers in a new one; translated, its
    chat completion continues it, C{continue_final_message}), a message or a tool result in one holds a block of
    L{TRANSLATED_BLOCKS}, a system message a tool change (L{gomodel.anthropic.translate.TOOL_CHANGES}), a
    user or assistant message is empty (L{gomodel.anthropic.translate.empty_content}: C{""}, C{[]}) or a string of
    nothing but whitespace, a message's content or a tool result's holds an empty text block, a message's text
    blocks are nothing but whitespace (L{gomodel.anthropic.translate.blank_block}), the system prompt is blank (its
    blocks, or a string of whitespace: L{gomodel.anthropic.translate.blank_system}), a tool call's result is not in
    the next message or a result's call not in the one before (L{gomodel.anthropic.translate.tool_pair_fault},
    looked at more widely: a system message between is translated too, where the translation passes it over), or
    an image's base64 type is none of Anthropic's (L{gomodel.anthropic.translate.refused_image}) (the translation
    refuses each as Anthropic does; vLLM's Messages API would take them, dropping an empty block and generating from
    the rest) (what a vLLM gets translated, L{gomodel.api.messages.translates}; once it is known, the walk looks no
    more for it), and the C{(message, block)} indexes of the C{tool_result} blocks whose C{is_error} is true
    (L{gomodel.anthropic.translate.with_tool_errors}).

    (No scan of the body's bytes for those words first: on a long Claude Code conversation, 200 messages in
    82 kB, scanning for them took longer than this walk: bench/messages_blocks.py.)
    """
    found, errored = [], []
    messages = body.get("messages")
    if not isinstance(messages, list):
        return found, False, errored
    last = messages[-1] if messages else None
    translated = isinstance(last, dict) and last.get("role") == "assistant"  # (a prefill)
    system = body.get("system")
    if system is not None:
        translated = translated or blank_system(system)
    called = {}  # tool_use id -> the index of its message, until a tool_result answers it
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not content or content.__class__ is not list:
            # ("", [], a string of whitespace: Anthropic's 400s, translated; a system message's is left out there, the
            # last message's, a prefill's, is translated already)
            if not content:
                translated = translated or empty_content(content) and message.get("role") != "system"
            elif content.__class__ is str and content.isspace():
                translated = translated or message.get("role") != "system"
            continue
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":  # (the most blocks: looked at first; a system message's texts, empty left out there)
                text = block.get("text")
                if text == "" or text.__class__ is str and text.isspace():
                    translated = translated or message.get("role") != "system" and (
                        text == "" or blank_block(content) is not None)
            elif kind in _LOOKED_AT:
                translated = translated or kind in TRANSLATED_BLOCKS or kind == "image" and refused_image(block)
                if files and _names_file(block):
                    found.append((f"messages.{i}.content.{j}", block))
            elif kind == "tool_use":
                call_id = block.get("id")
                if call_id.__class__ is str:
                    called[call_id] = i
                else:  # (the translation refuses it, or gives it an id)
                    translated = True
            elif kind == "tool_result":
                # (its call in the message before: else, or if a call is left unanswered, tool_pair_fault's 400, or a
                # system message between, which the translation passes over; an id that is no string, its 400)
                call_id = block.get("tool_use_id")
                translated = translated or call_id.__class__ is not str or called.pop(call_id, None) != i - 1
                if block.get("is_error") is True:
                    errored.append((i, j))
                if not isinstance(block.get("content"), list):
                    continue
                for k, item in enumerate(block["content"]):
                    kind = item.get("type") if isinstance(item, dict) else None
                    if kind == "text":
                        translated = translated or item.get("text") == ""
                    elif kind in _LOOKED_AT:
                        translated = translated or kind in TRANSLATED_BLOCKS or kind == "image" and refused_image(item)
                        if files and _names_file(item):
                            found.append((f"messages.{i}.content.{j}.content.{k}", item))
            elif kind in TOOL_CHANGES:
                translated = translated or message.get("role") == "system"
    if called:
        translated = True
    return found, translated, errored


def _names_file(block) -> bool:
    """Whether C{block}, an image or a document, names a file."""
    source = block.get("source")
    return isinstance(source, dict) and source.get("type") == "file" and block["type"] != "search_result"


class FileSources:
    """Resolves the file sources of a Messages request from the gateway's files."""

    def __init__(self, files, blobs):
        """
        @param files: the L{gomodel.store.interfaces.IFileStore}.
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} holding the contents.
        """
        self._files = files
        self._blobs = blobs

    async def resolve(self, blocks, principal, limit=MAX_INLINE):
        """Replace the source of each of C{blocks} (L{file_blocks}'s) by the contents of the file it names,
        which C{principal} may see (a file named twice is read once).

        @param limit: the most bytes inlined in all (a request's: L{MAX_INLINE}; a message batch's: L{MAX_BATCH}).
        @raise InvalidRequest: a source names no file of the key's, files past C{limit}, or an image that is none.
        """
        read, total = {}, 0
        for where, block in blocks:
            file_id = block["source"].get("file_id")
            if not isinstance(file_id, str) or not file_id:
                raise InvalidRequest(f"{where}.source.file_id: Field required", param=f"{where}.source.file_id")
            if file_id not in read:
                read[file_id] = await self._read(file_id, principal, where)
            record, data = read[file_id]
            total += len(data)
            if total > limit:
                raise InvalidRequest(f"{where}.source: the files named hold more than the {limit} bytes a "
                                     f"{'batch' if limit == MAX_BATCH else 'request'} may", param=f"{where}.source")
            block["source"] = _source(block["type"], data, record["filename"], where)

    async def _read(self, file_id, principal, where):
        """C{(record, contents)} of file C{file_id} that C{principal} may see.

        @raise InvalidRequest: there is none (the store not asked where none can be: L{held_nowhere}), or it is past
            L{MAX_INLINE}.
        """
        record = await self._files.get(file_id) if not held_nowhere(file_id) else None
        # (as gomodel.api.files.client_file sees them: not imported, it would bring Klein to the hot path)
        if record is None or record["purpose"] == MESSAGE_BATCH_PURPOSE or not visible(principal, record):
            record = None
        elif record["bytes"] > MAX_INLINE:
            raise InvalidRequest(f"{where}.source: file {shown(file_id)} is larger than the {MAX_INLINE} bytes "
                                 "a message may hold", param=f"{where}.source")
        data = await self._blobs.read(file_id, 0, record["bytes"]) if record is not None else None
        if data is None:
            raise InvalidRequest(f"{where}.source.file_id: no file {shown(file_id)} (upload it with the "
                                 "Files API first)", param=f"{where}.source.file_id")
        return record, data


def _source(kind, data: bytes, filename, where) -> dict:
    """The inline source of an C{image} or C{document} block (C{kind}) holding C{data}."""
    if kind == "image":
        media = next((media for magic, media in _IMAGE_MAGIC if data.startswith(magic)), None)
        if media is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            media = "image/webp"
        if media is None:
            raise InvalidRequest(f"{where}.source: file {shown(filename)} is no image (JPEG, PNG, GIF or WebP)",
                                 param=f"{where}.source")
        return {"type": "base64", "media_type": media, "data": base64.b64encode(data).decode("ascii")}
    if data.startswith(_PDF_MAGIC):
        return {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(data).decode("ascii")}
    if mime_type(filename) == "application/pdf":  # (its name is no proof: its bytes are)
        raise InvalidRequest(f"{where}.source: file {shown(filename)} is named as a PDF but holds none (its "
                             "contents do not start with %PDF-)", param=f"{where}.source")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{where}.source: file {shown(filename)} is neither a PDF nor UTF-8 text",
                             param=f"{where}.source") from None
    return {"type": "text", "media_type": "text/plain", "data": text}
