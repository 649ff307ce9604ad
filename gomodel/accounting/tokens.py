"""Token counts by type, read from a usage object in any of the namings the gateway relays, and the
output a request body asks for."""

import re

from gomodel import jsonutil

# (its value's number, whole; none where the value is no number: a string, a bool, null)
_MAX_TOKENS = re.compile(rb'"max_(?:completion_|output_)?tokens"\s*:\s*(\d[\d.eE+-]*)?')
_MAX_FIELDS = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens"))
# Each such field alone, as L{_MAX_TOKENS}.
_MAX_FIELD = {name: re.compile(rb'"%s"\s*:\s*(\d[\d.eE+-]*)?' % name.encode()) for name in _MAX_FIELDS}

# What bounds the output of a request to a route, as vLLM 0.32's request models read its body: the fields that cap
# each sequence's tokens, in the order they are read (the first that is a count wins: chat's
# max_completion_tokens over its max_tokens; a field the route has not is ignored, as vLLM ignores unknown
# fields), and whether its C{n} asks for that many sequences (Responses and Messages have no C{n}). No route
# counts C{best_of}: vLLM 0.32's completions has none (it is ignored).
_CHAT = (("max_completion_tokens", "max_tokens"), True)
_ROUTES = {"chat/completions": _CHAT, "completions": (("max_tokens",), True),
           "responses": (("max_output_tokens",), False), "messages": (("max_tokens",), False)}
# (every spelling of a route's path: the routes' C{/chat/completions}, a passthrough's C{v1/chat/completions})
_ROUTES = {prefix + route: rule for route, rule in _ROUTES.items() for prefix in ("", "/", "v1/", "/v1/")}
# Any other path (a passthrough's own, none given): the first of the fields sent, each sequence of its C{n}.
_ANY = (None, True)
# A text completion's paths (L{_ROUTES}' spellings): its sequences are its C{n} for each of its prompts, and it
# generates L{COMPLETION_DEFAULT} tokens each where it sends no C{max_tokens} (L{completion_tokens}).
_COMPLETIONS = frozenset(prefix + "completions" for prefix in ("", "/", "v1/", "/v1/"))
# vLLM's (and OpenAI's) text completions' C{max_tokens} where a body sends none (chat's is the model's whole context,
# unknown here: none reserved).
COMPLETION_DEFAULT = 16

TOKEN_TYPES = ("input", "output", "cached", "reasoning")
# The most tokens a count may say: no request's count comes near a trillion. A larger one (an upstream's
# error) is no count: past 64 bits it could be written in no store's column, and the rows buffered with it
# would fail every write; below that it would still overflow the sums of usage and budgets.
MAX_COUNT = 10**12
# The most seconds of audio a usage object may say (a year's: no request's recording comes near it).
MAX_SECONDS = 366 * 86400


def tokens_by_type(usage: dict) -> tuple:
    """The counts of L{TOKEN_TYPES} in a usage object (chat's, the Responses API's or Anthropic's
    naming); 0 where unknown. A usage that says its C{total_tokens} alone (an older vLLM's rerank, as Jina's and
    Voyage's pooling APIs) read them all: they are its input.

    Anthropic's C{input_tokens} leaves out the prompt tokens read from or written to its
    cache (C{cache_read_input_tokens}, C{cache_creation_input_tokens}): they are added to
    the input, and the cache reads are the cached tokens, as in the other namings.
    """
    # (inline: this runs for every request; a count is an int from 1 to MAX_COUNT, never a bool, else 0. Each name
    # looked up by its own call, a naming's other name only where the first is missing: fewer instructions than
    # all ten through map(usage.get, names), although more bytecodes)
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = usage.get("input_tokens")
    prompt = prompt if prompt.__class__ is int and 0 < prompt <= MAX_COUNT else 0
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens")
    completion = completion if completion.__class__ is int and 0 < completion <= MAX_COUNT else 0
    if not prompt and not completion:  # a total alone (an older vLLM's rerank, Jina's): all of it was read
        prompt = _count(usage.get("total_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if details.__class__ is dict else 0
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if details.__class__ is dict else 0
    cache_read = usage.get("cache_read_input_tokens")
    cache_written = usage.get("cache_creation_input_tokens")
    if cache_read is not None or cache_written is not None:  # Anthropic's naming
        cache_read = _count(cache_read)
        prompt += cache_read + _count(cache_written)
        cached = cached or cache_read
    return prompt, completion, cached, reasoning


def audio_seconds(usage: dict):
    """The seconds of audio a usage object bills (a transcription's, OpenAI's whisper and vLLM's: C{{"type":
    "duration", "seconds": N}}), a float; None for any other usage (its tokens: L{tokens_by_type})."""
    seconds = usage.get("seconds")
    if seconds is None:
        return None
    if seconds.__class__ in (int, float) and 0 <= seconds <= MAX_SECONDS and usage.get("type") == "duration":
        return float(seconds)
    return None


def _count(value) -> int:
    return value if value.__class__ is int and 0 < value <= MAX_COUNT else 0


def total_tokens(usage: dict, tokens: tuple = None) -> int:
    """A usage object's C{total_tokens} (an int from 0 to L{MAX_COUNT}), else the input and output of its
    L{tokens_by_type} C{tokens} (worked out here when not given)."""
    total = usage.get("total_tokens")
    if total.__class__ is int and 0 <= total <= MAX_COUNT:
        return total
    if tokens is None:
        tokens = tokens_by_type(usage)
    return tokens[0] + tokens[1]


class Pricing:
    """The pricing table: qualified model (C{provider/model}) -> C{{input_per_mtok, output_per_mtok,
    cached_input_per_mtok}}, in the table's currency per million tokens, and C{audio_per_minute}, per minute of
    audio (a transcription billed in seconds: L{audio_seconds}). False when empty."""

    def __init__(self, table=None, providers=()):
        """
        @param providers: the provider instances' configs (C{name}, C{type}): a price keyed by a provider
            type that is no instance's name (C{vllm/X}, as clients name X at a type's first instance)
            prices X at every instance of that type, unless the table keys one by its own name.
        """
        self._table = dict(table or {})
        names = {provider.name for provider in providers}
        for qualified, price in list(self._table.items()):
            prefix, _, model = qualified.partition("/")
            if model and prefix not in names:
                for provider in providers:
                    if provider.type == prefix:
                        self._table.setdefault(f"{provider.name}/{model}", price)

    def __bool__(self):
        return bool(self._table)

    def costs(self, model, tokens, seconds=None) -> tuple:
        """C{(input_cost, output_cost, total_cost)} of L{tokens_by_type} C{tokens} and C{seconds} of audio
        (L{audio_seconds}, or None; an input: what was heard) on C{model}, or Nones where the model has no price
        or the tokens are unknown (C{tokens[0]} None)."""
        price = self._table.get(model)
        if price is None or tokens[0] is None:
            return None, None, None
        uncached = price.get("input_per_mtok", 0)
        input_cost = ((tokens[0] - tokens[2]) * uncached + tokens[2] * price.get("cached_input_per_mtok", uncached)) / 1e6
        if seconds:
            input_cost += seconds * price.get("audio_per_minute", 0) / 60
        output_cost = tokens[1] * price.get("output_per_mtok", 0) / 1e6
        return input_cost, output_cost, input_cost + output_cost


def requested_tokens(body, path=None):
    """The output tokens a JSON request C{body} (bytes) to C{path} (a route's, L{_ROUTES}: any other, or None, reads
    its first C{max_tokens}, C{max_completion_tokens} or C{max_output_tokens}) asks for at most: the count of its
    route's field vLLM reads (the body's own, not one inside a message, a tool's input or a schema) for each of
    the sequences its C{n} asks to generate, or None when it sends none. Read without parsing the body where that
    field is the body's own (L{_own}) and no C{n} is in it; else parsed (a body that is no JSON object: that
    field's number). A text completion's (L{_COMPLETIONS}): L{completion_tokens} of it parsed, None where that is 0
    or it is no JSON object (vLLM refuses it)."""
    if path in _COMPLETIONS:
        return _completion_requested(body)
    start = body.find(b'"max_') if body else -1  # most bodies send none: one scan in C, not the regex's
    if start < 0:
        return None
    names, sequences = _ROUTES.get(path, _ANY)
    asked = _asked(body, start, names)
    if asked is None or not sequences or body.find(b'"n"') < 0:  # (most bodies: one sequence)
        return asked
    return asked * _sequences(body)


def asked_tokens(fields: dict, path=None):
    """L{requested_tokens} of a request body to C{path} already parsed, C{fields} (a dict, as sent: the body is its
    dump), read from it without a scan of its bytes; 0 where it asks for none
    (L{gomodel.proxy.exchange.UpstreamCall}'s C{asked}). Not a text completion's: L{completion_tokens} reads that
    (its route calls it, so that no other route's request looks at its path here)."""
    if fields.keys().isdisjoint(_MAX_FIELDS):  # (most bodies send none: one look in C, not one per field)
        return 0
    names, sequences = _ROUTES.get(path, _ANY)
    value = _first_max(fields, names)
    if value is None:
        return 0
    if not sequences:
        return value
    n = fields.get("n")
    if n is None:  # (most bodies: one sequence)
        return value
    return value * sequence_count(n)


def completion_tokens(fields: dict, path=None) -> int:
    """L{asked_tokens} of a text completion's parsed body C{fields} (C{path} is its route's, unread): its
    C{max_tokens} (L{_asked_count}), else (none sent) vLLM's L{COMPLETION_DEFAULT}, for each of its
    L{completion_sequences}; 0 where it is null (vLLM then generates up to the model's whole context, unknown here)
    or no count."""
    value = _asked_count(fields.get("max_tokens", COMPLETION_DEFAULT))
    return value * completion_sequences(fields) if value else 0


def completion_sequences(fields: dict) -> int:
    """The sequences a text completion's parsed body C{fields} asks vLLM to generate (each a choice): its C{n}
    (L{sequence_count}) for each of its prompts, a C{prompt} that is a list of strings or of token id lists being
    that many, one of token ids (or any other) one."""
    n = fields.get("n")
    count = 1 if n is None else sequence_count(n)
    prompt = fields.get("prompt")
    if prompt.__class__ is list and prompt and prompt[0].__class__ is not int:
        count *= len(prompt)
    return count


def _completion_requested(body):
    """L{requested_tokens} of a text completion's JSON C{body} (bytes, or None)."""
    fields = _json_object(body) if body else None
    return None if fields is None else completion_tokens(fields) or None


def _json_object(body):
    """C{body} (JSON bytes) parsed, where it is an object (a request body as its route reads it); else None."""
    try:
        parsed = jsonutil.loads(body)
    except (jsonutil.JSONError, ValueError, TypeError):
        return None
    return parsed if parsed.__class__ is dict else None


def sequence_count(n) -> int:
    """A body's C{n} where it is a count of sequences (L{_asked_count}, from 1 to L{_MAX_SEQUENCES}), else 1."""
    count = _asked_count(n)
    return count if count is not None and 1 <= count <= _MAX_SEQUENCES else 1


def _asked_count(value):
    """A body's C{value} as vLLM reads an int field (pydantic's lax mode, L{_lax_int}: C{5}, C{5.0}, C{"5"} and
    C{true} generate as many tokens as their int; C{5.5} and C{"five"} are refused), from 0 up to 10**18; else None."""
    if value.__class__ is not int:  # (most bodies: an int)
        value = _lax_int(value)
    return value if value.__class__ is int and 0 <= value < 10**18 else None


def _lax_int(value):
    """The int pydantic's lax mode reads from a JSON C{value} that is no int (vLLM's request models: an int field
    takes a float with no fraction, a bool and a string of an int, L{_text_int}), or None where it refuses it."""
    kind = value.__class__
    if kind is float:
        return int(value) if value.is_integer() else None
    if kind is bool:
        return int(value)
    if kind is str:
        return _text_int(value)
    return None


_JSON_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
# The whitespace Rust's C{str::trim} strips (Unicode's White_Space; not Python's C{str.strip}, which strips more).
_TRIMMED = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
           "\u2028\u2029\u202f\u205f\u3000"


def _text_int(text):
    """The int pydantic reads from a string C{text} in lax mode, or None where it refuses it: pydantic-core's
    C{str_as_int}, step by step (its C{clean_int_str}): a JSON int as it is, else trimmed, one sign, leading
    zeros (and underscores among them) dropped, a fraction of zeros alone dropped, single underscores between
    digits dropped, and what is left a JSON int. So C{" +5 "}, C{"05"}, C{"5.0"} and C{"1_000"} are ints;
    C{"5."}, C{"1e3"}, C{"0x10"} and other scripts' digits are not."""
    if _JSON_INT.fullmatch(text):
        return _json_int(text)
    cleaned = text.strip(_TRIMMED)
    if cleaned[:1] == "+":
        cleaned = cleaned[1:]
        if cleaned[:1] == "-":
            return None
    negative = cleaned[:1] == "-"
    if negative:
        cleaned = cleaned[1:]
        if cleaned[:1] in ("-", "+"):
            return None
    cleaned = _without_leading_zeros(cleaned)
    if cleaned is None:
        return None
    point = cleaned.find(".")
    if 0 <= point < len(cleaned) - 1 and not cleaned[point + 1:].strip("0"):
        cleaned = cleaned[:point]
    if "_" in cleaned and cleaned[0] != "_" and cleaned[-1] != "_" and "__" not in cleaned:
        cleaned = cleaned.replace("_", "")
    elif len(cleaned) == len(text):  # (nothing cleaned: as refused as it came)
        return None
    if negative:
        cleaned = "-" + cleaned
    return _json_int(cleaned) if _JSON_INT.fullmatch(cleaned) else None


def _json_int(text):
    """The int of a JSON int's C{text}, or None past Python's 4300 digits (pydantic's bound too)."""
    try:
        return int(text)
    except ValueError:
        return None


def _without_leading_zeros(text):
    """C{text} from its first digit other than 0 (zeros and underscores before it dropped; the last zero kept
    before a point, or alone), as pydantic-core's C{strip_leading_zeros}; None where it starts with no digit nor
    minus."""
    if text[:1] != "0":
        return text if text[:1] in _SIGNIFICANT else None
    rest = text.lstrip("0_")
    if not rest:
        return text[-1]
    if rest[0] in _SIGNIFICANT:
        return rest
    return text[-len(rest) - 1:] if rest[0] == "." else None


_SIGNIFICANT = frozenset("123456789-")


def _sequences(body) -> int:
    """The sequences a JSON request C{body} has generated: its own C{n} (chat, completions: each a choice); 1 where
    it says none (or no number)."""
    parsed = _json_object(body)
    if parsed is None:
        return 1
    n = parsed.get("n")
    return 1 if n is None else sequence_count(n)


# The most sequences one request is counted to generate (a larger C{n} is the upstream's to refuse).
_MAX_SEQUENCES = 1024


def _asked(body, start, names):
    """The output tokens of one sequence of C{body} (L{requested_tokens}) from the first of its fields C{names} sent
    (None: any of L{_MAX_FIELDS}), whose first C{"max_} is at C{start}."""
    if names is None:
        found = _MAX_TOKENS.search(body, start)
    else:
        for name in names:  # (a field named nowhere, its key in no object, is not the body's own)
            found = _MAX_FIELD[name].search(body, start)
            if found is not None:
                break
    if found is None:
        return None
    number = found[1]
    if number is not None and number.isdigit() and len(number) <= 18 and _own(body, found.start(), found.end()):
        return int(number)
    parsed = _json_object(body)
    if parsed is None:
        return _number(number)
    return _first_max(parsed, names)


def _number(text: bytes):
    """The count (L{_asked_count}) a number's JSON C{text} writes, or None (None for none)."""
    if text is None:
        return None
    try:
        return _asked_count(jsonutil.loads(text))
    except (jsonutil.JSONError, ValueError, TypeError):
        return None


def _first_max(fields, names=None):
    """The first of a parsed body's C{fields} named in C{names} (in their order; None: any of L{_MAX_FIELDS}, in
    the body's order) whose value is a count (L{_asked_count}), or None."""
    if names is not None:
        for name in names:
            value = fields.get(name)
            if value is not None:
                value = _asked_count(value)
                if value is not None:
                    return value
        return None
    for name, value in fields.items():
        if name in _MAX_FIELDS:
            count = _asked_count(value)
            if count is not None:
                return count
    return None


def _own(body, at, end) -> bool:
    """Whether the field of C{body} from C{at} to C{end} (a key and its number) is surely at the top of the JSON
    object C{body}: a field at depth d has d more closers than openers after it and d more openers than closers
    before it (a bracket in a string only adds to the counts), so one C{"}"} and no C{"]"} after it, or one
    C{"{"} and no C{"["} before it, say so; else what follows it read as an object (the fields after it: one
    more closer, and no object, past the first level)."""
    if body.count(b"}", end) == 1 and body.find(b"]", end) < 0 or \
            body.count(b"{", 0, at) == 1 and body.find(b"[", 0, at) < 0:
        return True
    rest = body[end:].lstrip()
    if rest[:1] != b",":
        return False
    try:
        jsonutil.loads(b"{" + rest[1:])
    except (jsonutil.JSONError, ValueError, TypeError):
        return False
    return True


def without_max_tokens(body):
    """A JSON request C{body} (bytes) without its C{max_tokens}, for the limits' estimate of a route where that field
    asks for no output (Cohere's C{/v2/embed}: each input's truncation); None where it sends none or is no JSON
    object (the body itself is then what is counted)."""
    if not body or body.find(b'"max_tokens"') < 0:
        return None
    fields = _json_object(body)
    if fields is None or "max_tokens" not in fields:
        return None
    del fields["max_tokens"]
    return jsonutil.dumps(fields)


def prompt_estimate(body) -> int:
    """Tokens a JSON request C{body} (bytes) sends, estimated (about 4 characters a token) where no usage
    says them: the text of its C{messages}, C{prompt} or C{input}, with its C{system}, C{instructions} and
    C{tools} (data URLs left out: an image's bytes are no text), and a token for each token id a C{prompt} or
    C{input} holds (vLLM takes lists of them), else (a body that is not such JSON) its bytes / 4, the limits'
    estimate. 0 for no body.
    Parsed: only a request whose usage is missing (a stream cut before its usage chunk) needs it."""
    if not body:
        return 0
    parsed = _json_object(body)
    if parsed is None:
        return len(body) // 4
    for name in ("messages", "prompt", "input"):
        if name in parsed:
            sent = (parsed[name], parsed.get("system"), parsed.get("instructions"), parsed.get("tools"))
            text = -(-_text_length(sent) // 4)
            return text if name == "messages" else text + _token_ids(parsed[name])
    return len(body) // 4


def _token_ids(prompt) -> int:
    """The token ids in a C{prompt} or C{input}: the integers in it and in its lists (not in its objects)."""
    count, todo = 0, [prompt]
    while todo:
        item = todo.pop()
        if item.__class__ is int:
            count += 1
        elif item.__class__ is list:
            todo.extend(item)
    return count


def _text_length(values) -> int:
    """The characters of the strings in C{values} (nested in lists and objects), data URLs left out."""
    length, todo = 0, list(values)
    while todo:
        item = todo.pop()
        if item.__class__ is str:
            if not item.startswith("data:"):
                length += len(item)
        elif item.__class__ is list:
            todo.extend(item)
        elif item.__class__ is dict:
            todo.extend(item.values())
    return length
