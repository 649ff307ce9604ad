"""What a long Claude Code conversation's /v1/messages request costs the gateway to look at its blocks.

    PYTHONPATH=. python bench/messages_blocks.py [MESSAGES]

Builds a body of MESSAGES (200) messages as Claude Code sends them (text, tool_use, tool_result with text
content, a system prompt, tools), then counts the Python bytecodes (sys.settrace, opcode events) and times
(best of 7, 200 calls each) what L{gomodel.api.messages.MessagesRoutes.create} does with its blocks before
routing: before (8bf282e: two walks, C{file_blocks}, then C{translates}' C{has_documents}) and now
(L{gomodel.anthropic.file_sources.walk_blocks}: one walk, looking into image, document and search result blocks
only, and finding a system message's tool changes too, which C{has_tool_changes} walked the messages again for
before this walk took them: 21,625 bytecodes then, 18,590 since, on 200 messages); also a body holding one
document block. The last line times the byte scan that could spare the walk (the
body's bytes searched for C{"document"}, C{"search_result"}, C{"file"} and an escape, C{\\u}): it takes longer
than the walk, so there is none.
"""

import sys
import time

from gomodel import jsonutil
from gomodel.anthropic.file_sources import walk_blocks
from gomodel.anthropic.translate import has_tool_changes
from gomodel.api.messages import translates


def conversation(n, document=False):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test in tests/test_x.py."}]}]
    for i in range(1, n - 1):
        if i % 2:
            messages.append({"role": "assistant", "content": [
                {"type": "text", "text": "Let me look at the file."},
                {"type": "tool_use", "id": f"toolu_{i:024d}", "name": "Read",
                 "input": {"file_path": f"/repo/src/module_{i}.py"}}]})
        else:
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"toolu_{i - 1:024d}",
                 "content": [{"type": "text", "text": "def f():\n    return 1\n" * 20}]}]})
    messages.append({"role": "user", "content": "Go on."})  # (the last turn is the user's: no prefill)
    if document:
        messages[-2 if n % 2 else -3]["content"].append(
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}})
    body = {"model": "vllm/qwen", "max_tokens": 4096, "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code." * 50}], "messages": messages,
            "tools": [{"name": "Read", "description": "Read a file", "input_schema": {
                "type": "object", "properties": {"file_path": {"type": "string"}}}}]}
    return body, jsonutil.dumps(body)


# -- before (8bf282e), as it was: file_sources.file_blocks, then messages.has_documents ----------------


def _old_file_blocks(body) -> list:
    """C{(where, block)} for each C{image} or C{document} block of C{body}'s messages (and of their tool results)
    whose source is a file."""
    found = []
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(block, dict):
                continue
            if _old_names_file(block):
                found.append((f"messages.{i}.content.{j}", block))
            elif block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                found.extend((f"messages.{i}.content.{j}.content.{k}", item)
                             for k, item in enumerate(block["content"]) if _old_names_file(item))
    return found


def _old_names_file(block) -> bool:
    source = block.get("source") if isinstance(block, dict) else None
    return isinstance(source, dict) and source.get("type") == "file" and block.get("type") in ("image", "document")



_OLD_TRANSLATED_BLOCKS = ("document", "search_result")


def _old_has_documents(body) -> bool:
    """Whether a message of C{body}, or a tool result in one, holds a C{document} or C{search_result} block
    (L{_OLD_TRANSLATED_BLOCKS}). vLLM's Messages API has no such block: it refuses one in a message (a 400 that lists
    the block types it knows) and drops one in a tool result unread; translated, a text or custom-content document
    reaches the model as its text and image parts, a search result as its text, and a document that cannot (a
    PDF) is the gateway's 400 saying so."""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind in _OLD_TRANSLATED_BLOCKS:
                return True
            if kind == "tool_result" and isinstance(block.get("content"), list) and any(
                    isinstance(item, dict) and item.get("type") in _OLD_TRANSLATED_BLOCKS for item in block["content"]):
                return True
    return False



def _old_prefilled(body) -> bool:
    messages = body.get("messages")
    return isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"


def before(body, data):
    """What create did before: file_blocks, then translates (stop sequences, has_documents, prefill, tool changes)."""
    files = _old_file_blocks(body)
    return files, bool(body.get("stop_sequences")) or _old_has_documents(body) or _old_prefilled(body) \
        or has_tool_changes(body)


def now(body, data):
    files, translated, _ = walk_blocks(body)  # (the is_error tool results' indexes: none here)
    return files, translates(body, translated)


_MARKS = (b'"document"', b'"search_result"', b'"file"', b"\\u")


def scan(body, data):
    return [mark in data for mark in _MARKS]


def bytecodes(f, *args):
    count = [0]

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False

        def opcode(frame, event, arg):
            if event == "opcode":
                count[0] += 1
            return opcode
        return opcode
    sys.settrace(trace)
    try:
        f(*args)
    finally:
        sys.settrace(None)
    return count[0]


def seconds(f, *args, calls=200):
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            f(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for label, document in (("text and tools", False), ("one document block", True)):
        body, data = conversation(n, document)
        assert before(body, data)[1] == now(body, data)[1] == document
        print(f"{n} messages, {label}, {len(data)} bytes:")
        for name, f in (("before (two walks)", before), ("now", now)):
            print(f"  {name:20} {bytecodes(f, body, data):>7} bytecodes  {seconds(f, body, data) * 1e6:8.1f} us")
        print(f"  {'a byte scan alone':20} {bytecodes(scan, body, data):>7} bytecodes  "
              f"{seconds(scan, body, data) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
