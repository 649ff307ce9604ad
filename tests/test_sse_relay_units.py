"""The SSE framer/observer and the relay, driven by hand on fake transports and a fake clock."""

import json

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface.verify import verifyObject

from gomodel.proxy.relay import (END_LINGER, ClientStalled, StreamRelay, StreamTooLong, UpstreamIdle,
                                 UpstreamLingered)
from gomodel._twistedcompat import send_now
from gomodel.timers import Timers
from gomodel.proxy.sse import (ChatStreamObserver, ChoicesStreamObserver, ResponsesStreamObserver, SSEFramer, StreamIncomplete, earliest,
                               event_at, event_data)
from tests.support import copy_counting_bytes

USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\xc3\xa9"}}]}\n\n'


def test_framer_cuts_on_bytes_across_reads():
    framer = SSEFramer()
    stream = CHUNK + b"event: x\r\ndata: y\r\n\r\n" + b"data: [DONE]\n\n"
    events = []
    for i in range(len(stream)):  # one byte at a time, splitting the UTF-8 character too
        events += framer.feed(stream[i:i + 1])
    assert events == [CHUNK, b"event: x\r\ndata: y\r\n\r\n", b"data: [DONE]\n\n"]
    assert event_data(events[1]) == b"y"
    assert framer.pending == b""


def test_framer_hands_a_read_of_one_whole_event_on_as_it_is():
    framer = SSEFramer()
    assert framer.feed(b"d") == [] and framer.pending == b"d"  # one byte: no event yet
    assert framer.feed(b"ata: 1\n\n") == [b"data: 1\n\n"] and framer.pending == b""
    read = b"data: 2\n\n"
    assert framer.feed(read)[0] is read  # a model's read of one token: no copy
    assert framer.feed(b"data: 3\n\n\n") == [b"data: 3\n\n"] and framer.pending == b"\n"
    assert framer.feed(b"\ndata: 4\n\n") == [b"\n\n", b"data: 4\n\n"]


def test_framer_bounds_an_unterminated_event():
    framer = SSEFramer(max_event_bytes=100)
    with pytest.raises(StreamIncomplete):
        framer.feed(b"data: " + b"x" * 200)


def test_observer_strips_only_the_forced_usage_chunk():
    observer = ChatStreamObserver(strip_usage=True)
    out = observer.feed(CHUNK + USAGE[:10]) + observer.feed(USAGE[10:] + b"data: [DONE]\n\n")
    assert out == CHUNK + b"data: [DONE]\n\n"
    assert observer.usage == {"prompt_tokens": 1, "completion_tokens": 2}
    observer.finish()

    keeping = ChatStreamObserver(strip_usage=False)
    assert keeping.feed(CHUNK + USAGE + b"data: [DONE]\n\n") == CHUNK + USAGE + b"data: [DONE]\n\n"
    assert keeping.usage["completion_tokens"] == 2


@pytest.mark.parametrize("long", [False, True])
def test_a_streams_end_and_usage_split_anywhere_across_reads_are_seen(long):
    """Wherever the upstream's reads cut the usage chunk or C{data: [DONE]} (in a word, in its blank line), short
    reads and long ones (a stream's tail read at once) alike: the client gets the same bytes, the usage and the
    end are seen, and a C{[DONE]} only mentioned in a token is no end."""
    lead = CHUNK * (40 if long else 1) + b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n'
    stream = lead + USAGE + b"data: [DONE]\n\n"
    for cut in range(len(lead) - 20, len(stream)):
        observer = ChatStreamObserver(strip_usage=True)
        out = observer.feed(stream[:cut])
        assert not observer.done or cut == len(stream)
        out += observer.feed(stream[cut:])
        assert out == lead + b"data: [DONE]\n\n", cut
        assert observer.done and observer.usage == {"prompt_tokens": 1, "completion_tokens": 2}, cut
        observer.finish()
    observer = ChatStreamObserver(strip_usage=True)
    assert observer.feed(lead) == lead and not observer.done  # (the token's words: no end)
    with pytest.raises(StreamIncomplete):
        observer.finish()


def test_observer_looks_into_a_read_of_many_events_only_where_a_watched_word_is():
    from gomodel.proxy.sse import mentions

    assert mentions(b"abc [DONE]", (b'"usage"', b"[DONE]")) and not mentions(b"abc", (b"[DONE]",))
    observer = ChatStreamObserver(strip_usage=True)
    plain = CHUNK * 3
    assert observer.feed(plain) == plain and observer.events == 3 and not observer.done
    # the usage chunk amid others is dropped, the rest keep their order; the end is seen
    assert observer.feed(CHUNK + USAGE + CHUNK + b"data: [DONE]\n\n") == CHUNK + CHUNK + b"data: [DONE]\n\n"
    assert observer.usage["prompt_tokens"] == 1 and observer.done
    # a watched word split between two reads is looked for once its event is whole
    observer = ChatStreamObserver(strip_usage=False)
    assert observer.feed(CHUNK + b"data: [DO") == CHUNK and not observer.done
    assert observer.feed(b"NE]\n\n") == b"data: [DONE]\n\n" and observer.done

    responses = ResponsesStreamObserver()
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
    end = (b'event: response.completed\ndata: {"type":"response.completed","response":'
           b'{"id":"r","usage":{"input_tokens":1,"output_tokens":2}}}\n\n')
    assert responses.feed(delta * 2) == delta * 2 and not responses.done
    assert responses.feed(delta + end) == delta + end and responses.done
    assert responses.usage == {"input_tokens": 1, "output_tokens": 2}


def test_a_chat_read_of_whole_plain_events_goes_as_it_came_without_the_framer():
    """A read of whole LF events after whole events, none holding a watched word (a model's read of a token), and no
    longer than LONG_READ, is passed on as it came and counted as the framer counts events, without the framer; any
    other read (half an event, after half an event, CR line breaks, a watched word, a long read) goes through it,
    and what each gives is the same."""
    from gomodel.proxy.sse import LONG_READ

    class Unused(SSEFramer):
        def feed(self, data):
            raise AssertionError("framed")

        feed_joined = feed

    observer = ChatStreamObserver(strip_usage=True)
    observer._framer = Unused()
    most = LONG_READ // len(CHUNK)
    for read in (CHUNK, CHUNK * 3, b"data: 1\n\n\n\n", CHUNK * most):
        assert observer.feed(read) is read
    assert observer.events == 1 + 3 + 2 + most
    observer = ChatStreamObserver(strip_usage=True)
    read = CHUNK * (most + 1)
    assert observer.feed(read) == read and observer.events == most + 1

    stream = (CHUNK + b"data: 1\n\n\n\n" + b"data: x\r\n\r\n" + CHUNK * 3 + b": comment\n\n" + USAGE + CHUNK
              + b"data: [DONE]\n\n")
    for size in (1, 7, len(CHUNK), len(CHUNK) + 1, 200, len(stream)):
        observer, framed, out = ChatStreamObserver(strip_usage=True), SSEFramer(), b""
        events = []
        for i in range(0, len(stream), size):
            out += observer.feed(stream[i:i + size])
            events += framed.feed(stream[i:i + size])
        assert out == b"".join(event for event in events if event != USAGE), size
        assert observer.events == len(events) and observer.done, size
        observer.finish()


def _choice_chunk(index, content, reason=None):
    return b'data: {"id":"c","choices":[{"index":%d,"delta":{"content":"%s"},"finish_reason":%s}]}\n\n' % (
        index, content.encode(), b"null" if reason is None else b'"%s"' % reason.encode())


def test_a_stream_of_several_choices_ends_well_once_each_said_why_in_reads_cut_anywhere():
    """L{ChoicesStreamObserver} holds each choice to its finish_reason, however the stream's bytes come in reads
    (CR line breaks too), relaying every byte as it came; the [DONE] of one whose choice did not end is dropped
    and L{finish} names that choice. L{ChatStreamObserver}'s check of one choice, where the reason is in the
    event before [DONE], holds however that event is cut too."""
    def stream(reasons, usage=True):
        events = [_choice_chunk(i, "h\u00e9") for i in range(len(reasons))]
        events += [_choice_chunk(i, "x", reason) for i, reason in enumerate(reasons)]
        return b"".join(events) + (USAGE if usage else b"") + b"data: [DONE]\n\n"

    cases = [(stream(["stop", "length"]), 2, None), (stream(["stop", "length", "stop"], False), 3, None),
             (stream(["abort", "stop"]), 2, 0), (stream(["stop", None]), 2, 1), (stream(["stop", "stop"]), 3, 2),
             (stream(["stop"]), 2, 1), (stream(["stop", "stop", "stop"]), 2, None),  # (one that came: ended)
             (stream(["stop", "stop", "abort"]), 2, 2)]
    for whole, choices, unended in cases:
        for crlf in (False, True):
            data = whole.replace(b"\n", b"\r\n") if crlf else whole
            for size in (1, 7, 40, 41, 100, len(data) - 1, len(data)):
                observer = ChoicesStreamObserver(False, None, choices)
                out = b"".join(observer.feed(data[i:i + size]) for i in range(0, len(data), size))
                if unended is None:
                    assert out == data and observer.done, (whole, size, crlf)
                    observer.finish()
                    continue
                assert out == data[:data.rfind(b"data: [DONE]")] and not observer.done, (whole, size, crlf)
                with pytest.raises(StreamIncomplete, match="choice %d ended without a finish_reason" % unended):
                    observer.finish()
    for whole, ends in ((CHUNK + _choice_chunk(0, "x", "stop") + b"data: [DONE]\n\n", True),
                        (CHUNK + _choice_chunk(0, "x", "stop") + USAGE + b"data: [DONE]\n\n", True),
                        (CHUNK + _choice_chunk(0, "x", "abort") + USAGE + b"data: [DONE]\n\n", False),
                        (CHUNK + _choice_chunk(0, "x") + b"data: [DONE]\n\n", False)):
        for size in range(1, len(whole) + 1):
            observer = ChatStreamObserver(False, reasons=True)
            out = b"".join(observer.feed(whole[i:i + size]) for i in range(0, len(whole), size))
            assert observer.done is ends and (out == whole) is ends, (whole, size)


def test_chat_observer_reads_a_long_read_as_event_by_event():
    from gomodel import jsonutil
    from gomodel.proxy.sse import LONG_READ

    padding = CHUNK * (LONG_READ // len(CHUNK) + 1)
    usage_too = b'data: {"id":"c","choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3}}\n\n'
    error = b'data: {"error":{"message":"boom","code":500}}\n\n'
    mention = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"say \\"usage\\" [DONE]"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    streams = [padding + USAGE + done, padding + mention + CHUNK + USAGE + done, padding + error,
               padding + usage_too + CHUNK + done, padding + done, USAGE + padding + done, padding,
               CHUNK + error + padding + USAGE + done, padding + done + mention]

    def by_events(stream, strip, crlf):  # every event looked at in turn
        seen = {"usage": None, "error": None, "done": False, "out": b"", "events": 0}
        for event in stream.split(b"\n\n")[:-1]:
            event += b"\n\n"
            seen["events"] += 1
            data = event[6:-2]
            if data == b"[DONE]":
                seen["done"] = True
            elif event.find(b'"usage"') >= 0 or event.find(b'"error"') >= 0:
                chunk = jsonutil.loads(data)
                if isinstance(chunk.get("error"), dict):
                    seen["error"] = chunk["error"]
                    seen["done"] = True  # (an error is the stream's end too)
                if isinstance(chunk.get("usage"), dict):
                    seen["usage"] = chunk["usage"]
                    if strip and chunk["choices"] == []:
                        continue
                    if strip:  # the usage beside choices: the chunk without it, written anew
                        del chunk["usage"]
                        seen["out"] += b"data: " + jsonutil.dumps(chunk) + b"\n\n"
                        continue
            seen["out"] += event.replace(b"\n", b"\r\n") if crlf else event
        return seen

    for stream in streams:
        for strip in (True, False):
            for crlf in (False, True):
                whole = stream.replace(b"\n", b"\r\n") if crlf else stream
                last = whole.rfind(b"data:")
                for reads in ([whole], [whole[:50], whole[50:]], [whole[:last], whole[last:]]):
                    observer = ChatStreamObserver(strip_usage=strip)
                    out = b"".join(observer.feed(read) for read in reads)
                    expected = by_events(stream, strip, crlf)
                    assert out == expected["out"]
                    assert (observer.usage, observer.error, observer.done) == (
                        expected["usage"], expected["error"], expected["done"])
                    if observer.usage is None:  # the events stand in for a usage: every one counted
                        assert observer.events == expected["events"]


def _scan_counting_bytes():
    """C{(Read, scanned)}: a C{bytes} subclass whose C{find} adds the bytes each search looked through, per word, to
    C{scanned} (a dict), to feed an observer reads whose searching a test counts."""
    scanned = {}

    class Read(bytes):
        def find(self, word, start=0, stop=None):
            stop = len(self) if stop is None else stop
            at = bytes.find(self, word, start, stop)
            scanned[word] = scanned.get(word, 0) + max(0, (stop if at < 0 else at + len(word)) - start)
            return at

        def count(self, word, start=0, stop=None):
            stop = len(self) if stop is None else stop
            scanned[word] = scanned.get(word, 0) + max(0, stop - start)
            return bytes.count(self, word, start, stop)

    return Read, scanned


def test_a_long_read_is_searched_for_each_watched_word_once():
    """A read of many events (an unpaced stream come whole: its first token goes with its end) is looked through
    once for each watched word: before, the check for a read holding none searched it for a stream's end, then the
    long read's own path searched it again (a chat stream's C{"usage"} twice, a Responses stream's
    C{response.completed} over the whole read where its last event is all it looks at), about a sixth of the
    gateway's work on such a stream. Nor is a Responses read that brought its usage counted for its deltas."""
    from gomodel import jsonutil
    from gomodel.proxy.sse import LONG_READ

    Read, scanned = _scan_counting_bytes()
    padding = CHUNK * (LONG_READ // len(CHUNK) + 1)
    stream = Read(padding + USAGE + b"data: [DONE]\n\n")
    observer = ChatStreamObserver(strip_usage=False)
    assert observer.feed(stream) == stream and observer.done and observer.usage["prompt_tokens"] == 1
    assert max(scanned.values()) <= len(stream), scanned

    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
    end = b"event: response.completed\ndata: %s\n\n" % jsonutil.dumps(
        {"type": "response.completed", "response": {"id": "r", "usage": {"input_tokens": 1, "output_tokens": 2}}})
    stream = Read(delta * (LONG_READ // len(delta) + 1) + end)
    scanned.clear()
    observer = ResponsesStreamObserver()
    assert observer.feed(stream) == stream and observer.done and observer.usage["output_tokens"] == 2
    assert max(scanned.values()) <= len(stream) and scanned[b"response.completed"] <= len(end), scanned
    # Its deltas, the estimate of a stream cut before its usage, are not counted once the read brought the usage.
    assert b'.delta"' not in scanned and observer.events == 0, scanned
    observer = ResponsesStreamObserver()
    assert observer.feed(stream[:-len(end)]) == stream[:-len(end)] and observer.events == LONG_READ // len(delta) + 1


def test_event_at_the_earliest_word_is_the_first_event_that_holds_one():
    words = (b'"usage"', b"[DONE]", b"data: b")  # (the last at an event's first byte)
    events = [b"data: a\n\n", b"data: usage\n\n", b'data: {"usage":1}\n\n', b"data: b\n\n",
              b"data: [DONE]\n\n"]
    for lo in range(len(events)):
        for hi in range(lo + 1, len(events) + 1):
            some = events[lo:hi]
            joined = b"".join(some)
            expected = next((i for i, e in enumerate(some) if any(e.find(w) >= 0 for w in words)), len(some))
            assert event_at(some, joined, earliest([joined.find(w) for w in words], len(joined))) == expected


def test_framer_holds_a_long_event_in_small_reads_without_copying_it_per_read():
    """An event of 1 MiB (a Responses stream's final response, a long output's) arriving in 1 KiB reads is held as
    its reads and joined once, when it ends, by feed and by feed_joined, whatever its line breaks: before, what was
    held was copied onto each read (and searched again), about 512 MiB copied for one event, the reactor held up
    for every stream. The reads here count what is copied onto them (and cut out of them)."""
    Read, copied = copy_counting_bytes()

    for nl in (b"\n", b"\r\n"):
        event = b'data: {"type":"response.completed","text":"' + b"A" * (1024 * 1024) + b'"}' + nl + nl
        body = CHUNK.replace(b"\n", nl) + event + b"data: [DONE]" + nl + nl
        for joined in (False, True):
            copied[0] = 0
            framer = SSEFramer()
            reads = [Read(body[at:at + 1024]) for at in range(0, len(body), 1024)]
            if joined:
                out = b"".join(framer.feed_joined(read)[0] for read in reads)
            else:
                out = b"".join(b"".join(framer.feed(read)) for read in reads)
            assert out == body and framer.pending == b""
            assert copied[0] < 2 * len(body), (nl, joined, copied[0])  # (before: about len(body) ** 2 / 2048)
    framer = SSEFramer(max_event_bytes=100)
    framer.feed(b"data: " + b"x" * 60)
    with pytest.raises(StreamIncomplete):  # (its reads held past the bound)
        framer.feed(b"x" * 60)


def test_framer_hands_whole_events_on_joined_without_cutting_them():
    framer = SSEFramer()
    assert framer.feed_joined(b"data: 1\n\ndata: 2\n\nda") == (b"data: 1\n\ndata: 2\n\n", None)
    assert framer.pending == b"da"
    assert framer.feed_joined(b"ta: 3") == (b"", None) and framer.pending == b"data: 3"
    read = b"\n\n"
    assert framer.feed_joined(read) == (b"data: 3\n\n", None) and framer.pending == b""
    read = b"data: 4\n\n"
    assert framer.feed_joined(read)[0] is read  # a read of whole events: no copy
    # CR line breaks: the events are cut, as feed cuts them
    assert framer.feed_joined(b"data: 5\r\n\r\ndata: 6\r\n") == (b"data: 5\r\n\r\n", [b"data: 5\r\n\r\n"])
    assert framer.feed_joined(b"\r\n") == (b"data: 6\r\n\r\n", [b"data: 6\r\n\r\n"])
    with pytest.raises(StreamIncomplete):
        SSEFramer(max_event_bytes=100).feed_joined(b"data: 7\n\ndata: " + b"x" * 200)


def test_responses_observer_reads_each_event_holding_a_watched_word_in_any_reads():
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
    created = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","error":null,'
               b'"status":"in_progress"}}\n\n')
    error = b'event: error\ndata: {"type":"error","code":"boom","message":"no"}\n\n'
    end = (b'event: response.completed\ndata: {"type":"response.completed","response":'
           b'{"id":"r","status":"completed","usage":{"input_tokens":1,"output_tokens":2}}}\n\n')
    for stream, done, erred in ((created + delta * 3 + b"\n" + end, True, False),
                                (created + delta + error, True, True), (created + delta * 2, False, False)):
        for crlf in (False, True):
            whole = stream.replace(b"\n", b"\r\n") if crlf else stream
            for size in (1, 7, 64, len(whole)):  # one read of it all, and the watched words cut across reads
                observer = ResponsesStreamObserver()
                out = b"".join(observer.feed(whole[i:i + size]) for i in range(0, len(whole), size))
                assert out == whole and observer.done is done, (crlf, size)
                assert (observer.error is not None) is erred
                if done and not erred:
                    assert observer.usage == {"input_tokens": 1, "output_tokens": 2}
                    assert observer.response["status"] == "completed"
                    observer.finish()
                else:
                    assert observer.usage is None


def test_a_responses_read_of_whole_plain_events_goes_as_it_came_without_the_framer():
    class Unused(SSEFramer):
        def feed_joined(self, data):
            raise AssertionError("framed")

    delta = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":4,'
             b'"delta":"hi"}\n\n')
    observer = ResponsesStreamObserver()
    observer._framer = Unused()
    for read in (delta, delta * 3, delta + b"\n\n"):
        assert observer.feed(read) is read
    assert observer.events == 5 and observer.next_sequence() == 5 and not observer.done
    # Any other read goes through the framer, and the stream's counts and end are what its reads in one make them.
    end = (b'event: response.completed\ndata: {"type":"response.completed","sequence_number":9,"response":'
           b'{"id":"r","status":"completed","usage":{"input_tokens":1,"output_tokens":2}}}\n\n')
    stream = delta * 2 + b"event: x\r\ndata: {}\r\n\r\n" + delta + end
    for size in (1, 7, len(delta), len(delta) + 3, len(stream)):
        observer = ResponsesStreamObserver()
        out = b"".join(observer.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        assert out == stream and observer.done and observer.next_sequence() == 10, size
        assert observer.usage == {"input_tokens": 1, "output_tokens": 2}
        observer.finish()
        observer, before = ResponsesStreamObserver(), stream[:-len(end)]  # (deltas are counted while no usage is known)
        assert b"".join(observer.feed(before[i:i + size]) for i in range(0, len(before), size)) == before
        assert observer.events == 3, size


def test_responses_observer_reads_a_long_read_from_its_last_event_as_event_by_event():
    from gomodel import jsonutil
    from gomodel.proxy.sse import LONG_READ

    def event(kind, **fields):
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), jsonutil.dumps(dict(fields, type=kind)))

    delta = event("response.output_text.delta", delta="x" * 300)
    created = event("response.created", response={"id": "r", "status": "in_progress"})
    error = event("error", code="boom", message="no")
    ends = [event(kind, response={"id": "r", "status": kind[9:], "usage": {"input_tokens": 1, "output_tokens": n}})
            for n, kind in enumerate(("response.completed", "response.incomplete", "response.failed"))]
    mention = event("response.output_text.delta", delta='the words response.completed and "error"')
    garbled = b"event: response.completed\ndata: {not json\n\n"
    padding = delta * (LONG_READ // len(delta) + 1)
    streams = [created + padding + end for end in ends] + [
        created + error + padding + ends[0],  # an error before the end, in the same read
        created + padding + ends[0] + mention,  # the end, then an event that only mentions it
        created + padding + ends[1] + garbled,  # the last event holds the word but is no JSON
        created + padding + mention, created + padding + error, created + padding]

    def by_events(stream):  # every event holding a watched word observed in turn
        seen = {"done": False, "error": None, "usage": None, "response": None}
        for one in stream.split(b"\n\n")[:-1]:
            try:
                payload = jsonutil.loads(one[one.index(b"data: ") + 6:])
            except jsonutil.JSONError:
                continue
            if payload["type"] == "error":
                seen.update(error=payload, done=True)
            elif payload["type"] in ("response.completed", "response.incomplete", "response.failed"):
                seen.update(done=True, response=payload["response"], usage=payload["response"]["usage"])
                if payload["type"] == "response.failed":  # (a failed response: the upstream's error)
                    seen["error"] = payload["response"].get("error") or {"code": "server_error",
                                                                         "message": "The response failed."}
        return seen

    for stream in streams:
        assert len(stream) > LONG_READ
        last = stream.rfind(b"event:")
        for reads in ([stream], [stream[:100], stream[100:]], [stream[:last], stream[last:]]):
            observer = ResponsesStreamObserver()
            assert b"".join(observer.feed(read) for read in reads) == stream
            seen = {"done": observer.done, "error": observer.error, "usage": observer.usage,
                    "response": observer.response}
            assert seen == by_events(stream), (stream[-120:], [len(read) for read in reads])


def test_observer_finish_requires_done_and_whole_events():
    observer = ChatStreamObserver(strip_usage=False)
    observer.feed(CHUNK)
    with pytest.raises(StreamIncomplete):
        observer.finish()
    observer.feed(b"data: [DO")
    with pytest.raises(StreamIncomplete):
        observer.finish()


def test_observer_records_in_band_errors():
    observer = ChatStreamObserver(strip_usage=False)
    observer.feed(b'data: {"error":{"message":"boom","type":"InternalServerError","code":500}}\n\n')
    assert observer.error["message"] == "boom"


class Harness:
    """A relay between a StringTransport upstream and a real Request on a dummy channel."""

    def __init__(self, timers=False, **timeouts):
        """
        @param timers: the relay's timers are the gateway's L{Timers} on its clock (C{self.timers}).
        """
        self.clock = Clock()
        if timers:
            self.timers = timeouts["timers"] = Timers(self.clock)
        self.request = Request(DummyChannel())
        self.request.method = b"POST"
        self.relay = StreamRelay(self.request, self.clock, **timeouts)
        self.upstream = StringTransport()
        self.relay.makeConnection(self.upstream)
        self.request.registerProducer(self.relay, True)

    def written(self):
        return self.request.channel.transport.written.getvalue()


ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


def test_relay_writes_each_upstream_read_at_once_in_the_turn_it_came():
    # The HTTP client hands over what one read brought in one delivery: each is written as it comes, the
    # reads of a burst (no time between them) too, and nothing waits for a later turn.
    h = Harness()
    h.relay.dataReceived(ROLE)
    assert h.written().endswith(ROLE)  # no token yet: written at once
    h.relay.dataReceived(CHUNK)
    assert h.written().endswith(CHUNK)  # the first token
    h.relay.dataReceived(CHUNK * 2)
    assert h.written().count(CHUNK) == 3  # the next read, at once too
    h.relay.dataReceived(CHUNK)
    assert h.written().count(CHUNK) == 4
    assert h.clock.getDelayedCalls() == []  # (no idle timeout: nothing scheduled)
    h.clock.advance(0.025)
    h.relay.dataReceived(CHUNK)
    assert h.written().count(CHUNK) == 5


class _Transport:
    connected = True
    disconnecting = False
    producerPaused = False
    dataBuffer = b""

    def __init__(self):
        self.flushes = 0
        self._tempDataBuffer = [b"held"]

    def doWrite(self):
        self.flushes += 1


def test_send_now_writes_a_tcp_transport_at_once_and_leaves_others_alone():
    transport = _Transport()
    send_now(transport)
    assert transport.flushes == 1
    transport.producerPaused = True  # a full buffer: the reactor drains it
    send_now(transport)
    transport.producerPaused, transport.disconnecting = False, True  # closing: the reactor finishes it
    send_now(transport)
    assert transport.flushes == 1
    transport.disconnecting, transport._tempDataBuffer = False, []  # nothing held: no empty write
    send_now(transport)
    assert transport.flushes == 1
    send_now(StringTransport())  # no doWrite (like TLS): nothing to do


def test_relay_is_a_push_producer_that_moves_backpressure_upstream():
    h = Harness()
    verifyObject(IPushProducer, h.relay)
    h.relay.dataReceived(CHUNK)  # past the first token
    h.relay.dataReceived(b"data: 1\n")
    h.relay.dataReceived(b"\n")
    assert h.written().count(b"data: 1\n\n") == 1
    h.relay.pauseProducing()
    assert h.upstream.producerState == "paused"
    h.relay.pauseProducing()  # re-entrant
    h.relay.resumeProducing()
    assert h.upstream.producerState == "producing"
    h.relay.connectionLost(Failure(ResponseDone()))
    assert h.relay.finished.called


def test_client_leaving_stops_the_upstream():
    h = Harness()
    h.relay.stopProducing()
    assert h.upstream.producerState == "stopped"
    assert h.relay.client_gone


def test_cancelling_finished_stops_the_upstream():
    h = Harness()
    h.relay.finished.cancel()
    assert h.upstream.producerState == "stopped"
    assert h.relay.finished.called
    h.relay.finished.addErrback(lambda f: f.trap(CancelledError))


def test_idle_timer_does_not_count_our_own_pauses():
    h = Harness(idle_timeout=5, stall_timeout=60)
    h.clock.advance(4)
    h.relay.dataReceived(b"data: 1\n\n")
    h.clock.advance(0)
    h.clock.advance(4)
    h.relay.pauseProducing()
    h.clock.advance(50)  # paused by the client for longer than the idle timeout
    assert not h.relay.finished.called
    h.relay.resumeProducing()
    h.clock.advance(5)
    assert h.upstream.producerState == "stopped"
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(UpstreamIdle)


def test_the_idle_timeout_counts_from_the_upstreams_last_bytes():
    h = Harness(idle_timeout=5)
    h.relay.dataReceived(CHUNK)  # past the first token
    for _ in range(4):
        h.clock.advance(3)
        h.relay.dataReceived(b"data: 1\n\n")  # t = 3, 6, 9, 12: never 5 s of silence
        assert len(h.clock.getDelayedCalls()) <= 2  # the idle timer (and a drain): not one per read
    h.clock.advance(4.9)
    assert not h.relay.finished.called
    h.clock.advance(0.1)  # 5 s after the last bytes
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(UpstreamIdle)
    assert h.upstream.producerState == "stopped"


def test_an_upstream_holding_its_body_open_after_the_streams_end_is_closed_after_the_linger():
    """Once the stream's end went out, the upstream's body has END_LINGER seconds to end, then the upstream is closed
    (UpstreamLingered). The wait runs on the gateway's timers (most streams arm it and cancel it at once): no
    reactor timer more for it."""
    h = Harness(timers=True, idle_timeout=300, observer=ChatStreamObserver(strip_usage=False))
    h.timers.callLater(0.5, lambda: None)  # (another's timeout, sooner)
    h.relay.dataReceived(CHUNK)
    h.clock.advance(0.025)
    reactor_timers = len(h.clock.getDelayedCalls())
    h.relay.dataReceived(b"data: [DONE]\n\n")
    # (pending: the other's, the idle timer, the linger)
    assert h.relay.end_written and len(h.timers._pending) == 3 and len(h.clock.getDelayedCalls()) == reactor_timers
    h.clock.advance(END_LINGER - 0.01)
    assert not h.relay.finished.called
    h.clock.advance(0.01)
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(UpstreamLingered) and h.upstream.producerState == "stopped"


@pytest.mark.parametrize("ending", ["upstream", "idle", "duration"])
def test_the_idle_and_duration_timeouts_run_on_the_gateways_timers(ending):
    """A stream's idle timeout and maximum duration are armed on the gateway's timers (no reactor timer of its
    own: one timer serves every stream's), fire as their own timers did, and a stream that ends leaves none."""
    h = Harness(timers=True, idle_timeout=5, max_duration=8)
    other = h.timers.callLater(60, lambda: None)  # (another's timeout, set first)
    assert len(h.clock.getDelayedCalls()) == 1 and len(h.timers._pending) == 3
    h.clock.advance(2)
    h.relay.dataReceived(CHUNK)
    failures = []
    h.relay.finished.addErrback(failures.append)
    if ending == "upstream":
        h.relay.connectionLost(Failure(ResponseDone()))
        assert h.relay.finished.called and not failures
        assert list(h.timers._pending) == [other]
        return
    h.clock.advance(4.9)  # t = 6.9: 4.9 s of silence
    assert not h.relay.finished.called
    if ending == "idle":
        h.clock.advance(0.1)  # 5 s after the last bytes
        assert failures[0].check(UpstreamIdle)
    else:
        h.relay.dataReceived(CHUNK)
        h.clock.advance(1.1)  # 8 s since it began
        assert failures[0].check(StreamTooLong)
    assert h.upstream.producerState == "stopped" and list(h.timers._pending) == [other]


@pytest.mark.parametrize("ending", ["done", "cut"])
def test_a_body_come_whole_with_its_head_is_relayed_at_once_without_a_timer(ending):
    """A short stream's whole body, come with its head, is relayed in one go and ended at once (its end, or the
    lack of one, as a body's end tells it): no idle timer armed, no wait for the body's end after the stream's."""
    clock = Clock()
    timers = Timers(clock)
    request = Request(DummyChannel())
    request.method = b"POST"
    ended = []
    relay = StreamRelay(request, clock, ChatStreamObserver(strip_usage=True), idle_timeout=300, timers=timers,
                        end_written=lambda: ended.append(True))
    body = ROLE + CHUNK + CHUNK + USAGE + (b"data: [DONE]\n\n" if ending == "done" else b"")
    relay.relay_whole(body)
    results = []
    relay.finished.addBoth(results.append)
    assert relay.wrote and not timers._pending and not clock.getDelayedCalls()
    written = request.channel.transport.written.getvalue()
    assert written.endswith(ROLE + CHUNK + CHUNK + (b"data: [DONE]\n\n" if ending == "done" else b""))
    assert relay.observer.usage == {"prompt_tokens": 1, "completion_tokens": 2}
    if ending == "done":
        assert results == [None] and ended == [True]
    else:
        assert results[0].check(StreamIncomplete) and ended == []


def test_a_relays_rewrite_writes_what_its_observer_passes_read_by_read_or_come_whole():
    """A relay's rewrite (the exchange's: a model's public id, transfer fields dropped) writes each of its observer's
    outputs, whole events, as the client gets them, read by read or come whole; the observer is the relay's own, and
    reads what the upstream sent."""
    def rewrite(data):
        return data.replace(b'"id":"c"', b'"id":"x"')

    h = Harness(observer=ChatStreamObserver(strip_usage=True))
    h.relay.rewrite = rewrite
    h.relay.dataReceived(ROLE + CHUNK[:10])
    h.relay.dataReceived(CHUNK[10:] + USAGE + b"data: [DONE]\n\n")
    assert h.written().endswith(rewrite(ROLE + CHUNK) + b"data: [DONE]\n\n") and b'"id":"c"' not in h.written()
    assert h.relay.observer.usage == {"prompt_tokens": 1, "completion_tokens": 2} and h.relay.end_written

    request = Request(DummyChannel())
    request.method = b"POST"
    relay = StreamRelay(request, Clock(), ChatStreamObserver(strip_usage=True))
    relay.rewrite = rewrite
    relay.relay_whole(ROLE + CHUNK + USAGE + b"data: [DONE]\n\n")
    written = request.channel.transport.written.getvalue()
    assert written.endswith(rewrite(ROLE + CHUNK) + b"data: [DONE]\n\n") and b'"id":"c"' not in written
    assert relay.observer.usage == {"prompt_tokens": 1, "completion_tokens": 2} and relay.finished.called


def test_stalled_client_and_overall_cap():
    h = Harness(stall_timeout=3)
    h.relay.pauseProducing()
    h.clock.advance(3)
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(ClientStalled)
    assert h.upstream.producerState == "stopped"

    h = Harness(max_duration=10)
    h.clock.advance(10)
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(StreamTooLong)
    assert h.clock.getDelayedCalls() == []


def test_upstream_failure_fails_finished():
    h = Harness(idle_timeout=5)
    h.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionError())])))
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(ResponseFailed)
    assert h.clock.getDelayedCalls() == []


def test_event_data_joins_every_data_line_whatever_the_events_shape():
    def by_lines(event):  # the field as the SSE format defines it (one space after the colon dropped)
        values = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
        return b"\n".join(v[1:] if v.startswith(b" ") else v for v in values)

    events = [b"data: {}\n\n", b"data:{}\n\n", b"data:  two spaces\n\n", b"data:\n\n", b"data: x", b"data",
              b"event: response.completed\ndata: {\"a\":1}\n\n", b"id: 1\ndata: a\ndata: b\n\n",
              b": data: a comment\ndata: real\n\n", b"event: data: x\n\n", b"event: x\n\n", b"",
              b"data: a\r\ndata: b\r\n\r\n", b"data: a\r\r", b"retry: 1\ndata: a\n\nid: 2\n", b"xdata: no\n\n",
              b"data: \xc3\xa9\n\n", b"data: [DONE]\n\n", b"data: a\rb\n\n", b"data: a\nb\n", b"data: a\nQ",
              b"data: a\r\n\n", b"data: \n\n", b"data: a\n\ndata: b\n\n"]
    for event in events:
        assert event_data(event) == by_lines(event), event


def test_first_place_is_where_the_earliest_word_begins():
    from gomodel.proxy.sse import first_place

    words = (b"completed", b"failed", b'"error"', b"ed")
    for data in (b"", b"x", b"..failed..completed", b'a"error"completed', b"completed", b"abc ed failed",
                 b"complete failed", b"failedcompleted"):
        for start in range(len(data) + 1):
            places = [at for at in (data.find(w, start) for w in words) if at >= 0]
            assert first_place(data, words, start) == min(places, default=len(data)), (data, start)
            for stop in range(start, len(data) + 1):  # a word beginning before stop, or stop
                places = [at for at in (data.find(w, start) for w in words) if 0 <= at < stop]
                assert first_place(data, words, start, stop) == min(places, default=stop), (data, start, stop)


def test_a_usage_that_is_no_object_is_no_usage_and_the_stream_still_ends():
    # The request's sinks (usage ledger, metrics, access log) read a usage object: anything else an upstream
    # sends there is no usage, not a sink's failure; a count that is no count is 0, not a cut stream.
    from twisted.internet.task import Clock

    from gomodel.translate.responses_chat import ChatToResponsesStream

    for usage in (b"5", b"[]", b'"x"', b"null"):
        observer = ResponsesStreamObserver()
        end = b'data: {"type":"response.completed","response":{"id":"r","usage":' + usage + b"}}\n\n"
        assert observer.feed(end) == end and observer.done and observer.usage is None
        observer.finish()

    translated = ChatToResponsesStream({"model": "m", "input": "hi"}, Clock())
    chunk = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
             b'"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n')
    odd = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":'
           b'{"prompt_tokens":"x","completion_tokens":3,"total_tokens":[1],"completion_tokens_details":5}}\n\n')
    translated.feed(chunk + odd + b"data: [DONE]\n\n")
    translated.finish()
    assert translated.done and translated.response["status"] == "completed"
    assert translated.response["usage"] == {"input_tokens": 0, "output_tokens": 3, "total_tokens": 3,
                                            "input_tokens_details": {"cached_tokens": 0},
                                            "output_tokens_details": {"reasoning_tokens": 0}}


def test_responses_streams_count_the_deltas_they_relay_for_an_estimate():
    """What a Responses stream cut before its final response (the client left, the upstream broke off, a drain's
    cut) made is estimated from its deltas, as a chat or Messages stream's is: before, native and translated
    Responses streams counted none, so such a stream was recorded and charged with no output at all."""
    from gomodel.translate.responses_chat import ChatToResponsesStream

    def event(kind, **fields):
        return (b"event: " + kind.encode() + b'\ndata: {"type":"' + kind.encode() + b'"'
                + b"".join(b',"%s":"%s"' % (k.encode(), v.encode()) for k, v in fields.items()) + b"}\n\n")

    native = [event("response.created"), event("response.output_text.delta", delta='a \\"quoted.delta\\"'),
              event("response.reasoning_text.delta", delta="b"), event("response.function_call_arguments.delta",
                                                                         delta="{"), event("response.output_text.done")]
    observer = ResponsesStreamObserver()
    stream = b"".join(native)
    for i in range(0, len(stream), 7):  # (cut anywhere: counted in whole events)
        observer.feed(stream[i:i + 7])
    assert observer.events == 3 and observer.usage is None

    translated = ChatToResponsesStream({"model": "m", "input": "hi"}, Clock())
    role = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    text = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    translated.feed(role + text + text)
    assert translated.events == 2 and translated.usage is None


def test_responses_translation_keeps_tool_calls_streamed_at_one_index_apart():
    """Calls an upstream streams at one index, each with its id (Ollama, Grok: every call of a turn at index 0), are
    each their own function_call item of a translated Responses stream; fragments naming no function go on with the
    call begun last at their index, whatever id a server puts on them (before: one call, the arguments of all glued
    into invalid JSON, the others lost)."""
    from gomodel.translate.responses_chat import ChatToResponsesStream

    def chunk(*calls, finish=None):
        return b"data: " + json.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": {"tool_calls": list(calls)}, "finish_reason": finish}]}).encode() + b"\n\n"

    def call(arguments, name=None, call_id=None, index=0):
        out = {"index": index, "function": {"arguments": arguments}}
        if name is not None:
            out["function"]["name"] = name
        if call_id is not None:
            out["id"] = call_id
        return out

    translated = ChatToResponsesStream({"model": "m", "input": "hi"}, Clock())
    translated.feed(chunk(call('{"city":', "weather", "call_a")) + chunk(call('"Paris"}', call_id="frag-1"))
                    + chunk(call('{"q":', "search", "call_b")) + chunk(call('"x"}'))
                    + chunk(call("{}", "time", "call_c", index=1), finish="tool_calls") + b"data: [DONE]\n\n")
    translated.finish()
    calls = [(i["call_id"], i["name"], json.loads(i["arguments"])) for i in translated.response["output"]
             if i["type"] == "function_call"]
    assert calls == [("call_a", "weather", {"city": "Paris"}), ("call_b", "search", {"q": "x"}),
                     ("call_c", "time", {})]


def test_a_translated_responses_stream_ends_each_item_before_the_next_begins():
    """A translated Responses stream ends its reasoning item (its text's and part's done, then the item's) before the
    message or the call after it is added, and the message before a call, as OpenAI's and vLLM's own streams do; a
    reasoning or text coming after a later item has begun is an item of its own (before: every item stayed open to
    the stream's end, so a client saw the model thinking until the answer had ended)."""
    from gomodel.translate.responses_chat import ChatToResponsesStream

    def chunk(delta, finish=None):
        return b"data: " + json.dumps({"id": "c", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"

    call = {"index": 0, "id": "call_a", "function": {"name": "get", "arguments": "{}"}}
    translated = ChatToResponsesStream({"model": "m", "input": "hi"}, Clock())
    sent = translated.feed(chunk({"reasoning": "hm"}) + chunk({"reasoning": "m"}) + chunk({"content": "I'll look"})
                           + chunk({"tool_calls": [call]}) + chunk({"reasoning": "then"})
                           + chunk({"content": "ok"}, "stop") + b"data: [DONE]\n\n")
    translated.finish()
    events = [json.loads(line[6:]) for line in sent.split(b"\n") if line.startswith(b"data: ")]
    at = [(e["type"], e.get("output_index")) for e in events]
    for index in range(5):  # (each item's events between its added and done; the next item added after that done)
        added, done = at.index(("response.output_item.added", index)), at.index(("response.output_item.done", index))
        assert all(where == index for _, where in at[added:done + 1] if where is not None), at
        if index < 4:
            assert done < at.index(("response.output_item.added", index + 1)), at
    kinds = [item["type"] for item in translated.response["output"]]
    assert kinds == ["reasoning", "message", "function_call", "reasoning", "message"]
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.done"] == kinds
    assert translated.response["output"][0]["content"][0]["text"] == "hmm"
    assert translated.response["output"][1]["content"][0]["text"] == "I'll look"
    assert all(item["status"] == "completed" for item in translated.response["output"])
    done_texts = [e["text"] for e in events
                  if e["type"] in ("response.reasoning_text.done", "response.output_text.done")]
    assert done_texts == ["hmm", "I'll look", "then", "ok"]
    assert at[-1] == ("response.completed", None)


class _ReadsOn:
    """An observer that reads on once its client left (a background stream not named yet), until a read says
    C{named}."""

    usage = None
    done = False

    def __init__(self):
        self.fed, self.over, self.name = [], 0, None

    def feed(self, data):
        self.fed.append(data)
        if b"named" in data:
            self.name = data
        return data

    def finish(self):
        pass

    def left(self):
        return True

    def named(self):
        return self.name is not None

    def read_on_over(self):
        self.over += 1


@pytest.mark.parametrize("ends", ["named", "silent", "ended"])
def test_a_relay_whose_observer_reads_on_after_its_client_left_closes_its_upstream_once_named_or_silent(ends):
    observer = _ReadsOn()
    h = Harness(observer=observer, idle_timeout=5)
    h.relay.dataReceived(b"head ")
    h.relay.finished.addErrback(lambda f: f.trap(CancelledError))
    h.relay.stopProducing()  # the client left
    h.relay.finished.cancel()  # (its request's wait, cancelled)
    assert h.upstream.producerState != "stopped"  # (read on)
    h.relay.dataReceived(b"more ")
    assert observer.fed == [b"head ", b"more "] and b"more" not in h.written()
    if ends == "named":
        h.relay.dataReceived(b"named")
    elif ends == "silent":
        h.clock.advance(5)  # (its idle timeout holds)
    if ends != "ended":
        assert h.upstream.producerState == "stopped"
    assert observer.over == 0
    h.relay.connectionLost(Failure(ResponseDone()))
    assert observer.over == 1 and h.clock.getDelayedCalls() == []


MESSAGE_START = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                 b'"role":"assistant","model":"m","content":[],"usage":{"input_tokens":3,"output_tokens":0}}}\n\n')
BLOCK_START = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
               b'"content_block":{"type":"text","text":""}}\n\n')


def test_a_messages_stream_pings_while_its_upstream_is_silent_and_its_idle_timeout_still_fires():
    """A translated Messages stream whose upstream is silent (a long prefill) starts the message and pings after
    its keepalive, then pings each keepalive of silence after, counted from the upstream's last bytes; the pings
    are no upstream bytes: the idle timeout still ends the stream, and none is sent after."""
    from gomodel.anthropic.translate import PING, ChatToMessagesStream
    h = Harness(timers=True, idle_timeout=25, observer=ChatToMessagesStream("m", keepalive=10.0))
    keepalive = h.relay.observer.keepalive
    h.clock.advance(keepalive - 0.1)
    assert h.written() == b""
    h.clock.advance(0.1)
    first = h.written()
    assert first.count(b"event: message_start") == 1 and first.endswith(PING)
    h.clock.advance(keepalive)
    assert h.written() == first + PING
    h.relay.dataReceived(ROLE + CHUNK)  # (t = 2 keepalives: the upstream's first bytes)
    assert h.written().count(b"event: message_start") == 1
    relayed = h.written()
    h.clock.advance(keepalive - 0.1)
    assert h.written() == relayed
    h.clock.advance(0.1)
    assert h.written() == relayed + PING
    h.clock.advance(25 - keepalive)  # 25 s after the upstream's last bytes, pings or not
    failures = []
    h.relay.finished.addErrback(failures.append)
    assert failures[0].check(UpstreamIdle)
    ended = h.written()
    h.clock.advance(3 * keepalive)
    assert h.written() == ended and h.timers._pending == {}


def test_a_native_messages_stream_pings_between_whole_events_before_and_after_message_start():
    """A native stream is relayed as it came, a ping only between two whole events, before message_start too
    (vLLM's prefill), none while the client holds the stream paused, none once the client left."""
    from gomodel.anthropic.translate import PING, MessagesStreamObserver
    h = Harness(idle_timeout=0, observer=MessagesStreamObserver(keepalive=10.0))
    keepalive = h.relay.observer.keepalive

    def body():
        return h.written().partition(b"\r\n\r\n")[2]
    h.clock.advance(keepalive * 2)
    assert body() == PING  # (before message_start: the prefill)
    h.relay.dataReceived(MESSAGE_START + BLOCK_START[:30])
    h.clock.advance(keepalive)
    sent = PING + MESSAGE_START + PING
    assert body() == sent
    h.relay.dataReceived(BLOCK_START[30:])
    assert body() == sent + BLOCK_START
    h.relay.pauseProducing()
    h.clock.advance(keepalive * 2)
    assert body() == sent + BLOCK_START
    h.relay.resumeProducing()
    h.relay.stopProducing()  # the client left
    h.relay.finished.addErrback(lambda _: None)
    h.clock.advance(keepalive * 2)
    assert body() == sent + BLOCK_START
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize("keepalive", [0.25, 3.0])
def test_a_messages_streams_keepalive_is_the_one_it_is_given(keepalive):
    """The keepalive a Messages stream is given (GOMODEL_MESSAGES_KEEPALIVE_SECONDS, through the routes) is the
    silence after which it pings, translated and native, on the relay's clock; before, 10 s whatever was wanted."""
    from gomodel.anthropic.translate import PING, ChatToMessagesStream, MessagesStreamObserver
    h = Harness(timers=True, idle_timeout=0, observer=ChatToMessagesStream("m", keepalive=keepalive))
    h.clock.advance(keepalive * 0.9)
    assert h.written() == b""
    h.clock.advance(keepalive * 0.1)
    assert h.written().endswith(PING) and h.written().count(PING) == 1
    h.clock.advance(keepalive)
    assert h.written().count(PING) == 2
    h = Harness(idle_timeout=0, observer=MessagesStreamObserver(keepalive=keepalive))
    h.relay.dataReceived(MESSAGE_START)
    h.clock.advance(keepalive * 0.9)
    assert not h.written().endswith(PING)
    h.clock.advance(keepalive * 0.1)
    assert h.written().endswith(MESSAGE_START + PING)


def test_a_messages_stream_with_a_keepalive_of_0_never_pings():
    """GOMODEL_MESSAGES_KEEPALIVE_SECONDS=0: no keepalive timer, no ping however long the upstream is silent."""
    from gomodel.anthropic.translate import ChatToMessagesStream, MessagesStreamObserver
    for observer in (ChatToMessagesStream("m", keepalive=0.0), MessagesStreamObserver(keepalive=0.0)):
        h = Harness(idle_timeout=0, observer=observer)
        assert h.clock.getDelayedCalls() == []
        h.relay.dataReceived(MESSAGE_START if isinstance(observer, MessagesStreamObserver) else ROLE)
        assert h.clock.getDelayedCalls() == []


def test_a_chat_stream_has_no_keepalive_timer():
    h = Harness(observer=ChatStreamObserver(strip_usage=True))
    assert h.clock.getDelayedCalls() == []
