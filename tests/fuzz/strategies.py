"""Hypothesis strategies for hostile input: bodies built from the msgspec wire
types and then mutated, headers, query strings, path parameters, and the
settings every fuzz test runs under.

`body(T, good, bad)` draws a value of the msgspec struct `T` as plain JSON data,
each field from its domain hints when there are some (a valid label set, a real
token; a hostile one), else from its type: a new field of a wire type is
covered without touching this module. `mutated(value)` then breaks it the ways
a hostile client would: wrong types, unknown or missing fields, huge strings,
deep nesting, odd unicode, NUL bytes, extreme numbers, duplicate keys, and
byte-level damage to the encoding.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from segd.policy import DEFAULT_DIMENSIONS, VALUE_RE

# ---- settings ------------------------------------------------------------------------

# SEGD_FUZZ_SCALE multiplies every example count (e.g. 10 for a long local run).
SCALE = float(os.environ.get("SEGD_FUZZ_SCALE", "1"))
_QUIET = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]


def fast(examples: int) -> settings:
    """The default run: deterministic, no example database, bounded."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=_QUIET,
        print_blob=False,
    )


def slow(examples: int) -> settings:
    """`make test-long`: more examples, a fresh random seed each run."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=_QUIET,
    )


def pick(values: Sequence[Any]) -> st.SearchStrategy[Any]:
    """One of `values`, drawn as an index. The values mirror the server's state
    and change between examples; a fixed-size draw keeps hypothesis's replays of
    an example consistent."""
    snapshot = list(values) or [""]
    return st.integers(0, 1023).map(lambda i: snapshot[i % len(snapshot)])


# ---- hostile text --------------------------------------------------------------------

# Syntax of every language a value could be pasted into: SQL, shells, nftables,
# JSON, paths, log lines, and what unicode does to each.
HOSTILE = [
    "x'; DROP TABLE workloads; --",
    "' OR '1'='1",
    "$(reboot)",
    "`reboot`",
    "a;reboot",
    "a && reboot",
    "} ; flush ruleset",
    "}\nflush ruleset\n",
    '" ; add rule inet segd input accept ; "',
    "@ls_0000000000000000",
    "db\n",
    "db\r\n",
    "\ndb",
    "d\x00b",
    "db\x00",
    "\t",
    " db",
    "db ",
    "..",
    "../../etc/passwd",
    "%00",
    "%0a",
    "\\",
    '"',
    "{}",
    "*",
    "\u202edb",
    "\u2028",
    "\uff44\uff42",
    "DB",
    "é",
    "\U0001f525",
    "\ufeffdb",
    "a" * 63,
    "a" * 64,
    "a" * 300,
    "",
]

# Lone surrogates: json.dumps writes them as \\udXXX escapes, which no decoder should take.
_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
text = st.one_of(st.sampled_from(HOSTILE), _TEXT)

NEAR = ["\n", "\r\n", "\r", " ", "\t", "\x00", "\x0b", "\x0c", "\x85", "\u2028", "\ufeff", ";", "'"]


def near(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A near miss: a valid value with one stray character before or after it
    (what a `$` that matches before a final newline lets through)."""
    return st.tuples(valid, st.sampled_from(NEAR), st.booleans()).map(
        lambda t: t[0] + t[1] if t[2] else t[1] + t[0]
    )


good_value = st.one_of(
    st.sampled_from(["db", "web", "shop", "prod", "eu-1", "v1.2_3"]),
    st.from_regex(VALUE_RE, fullmatch=True),
)
value = st.one_of(near(good_value), st.sampled_from(HOSTILE))
dimension = st.one_of(
    st.sampled_from(DEFAULT_DIMENSIONS),
    st.sampled_from(["colour", "Role", "role ", "r\nole", "x" * 40, "", "1st"]),
)


def good_labels(dims: tuple[str, ...] = DEFAULT_DIMENSIONS) -> st.SearchStrategy[Any]:
    return st.dictionaries(st.sampled_from(dims), good_value, max_size=len(dims))


bad_labels = st.one_of(
    st.tuples(good_labels(), dimension, st.one_of(value, text)).map(lambda t: {**t[0], t[1]: t[2]}),
    st.dictionaries(dimension, st.one_of(value, text), min_size=1, max_size=6),
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}", fullmatch=True), good_value, min_size=17, max_size=40
    ),
)
good_services = st.lists(
    st.one_of(
        st.sampled_from(["tcp/80", "udp/53", "icmp", "tcp/8000-8100", "TCP/443", " tcp/22 "]),
        st.builds(
            lambda p, q: f"tcp/{min(p, q)}-{max(p, q)}",
            st.integers(1, 65535),
            st.integers(1, 65535),
        ),
        st.integers(1, 65535).map(lambda p: f"udp/{p}"),
    ),
    min_size=1,
    max_size=4,
)
_BAD_SERVICE = st.one_of(
    st.from_regex(r"(tcp|udp)/[0-9]{1,6}(-[0-9]{1,6})?", fullmatch=True),
    st.sampled_from(["tcp/0", "tcp/65536", "tcp/9-1", "sctp/1", "tcp/", "icmp/1", "tcp/-1"]),
    st.sampled_from(
        ["tcp/٨٠", "tcp/\uff18\uff10", "tcp/8_0", "tcp/80 ; flush ruleset", "tcp/+80", "tcp/80-"]
    ),
    near(st.sampled_from(["tcp/80", "icmp", "udp/53-54"])),
    text,
)
# One bad service among good ones, or too many.
bad_services = st.one_of(
    st.tuples(good_services, _BAD_SERVICE).map(lambda t: [*t[0], t[1]]),
    st.lists(st.integers(1, 65535).map(lambda p: f"tcp/{p}"), min_size=65, max_size=70),
)


def good_selectors(dims: tuple[str, ...] = DEFAULT_DIMENSIONS) -> st.SearchStrategy[Any]:
    return st.one_of(st.just("any"), st.lists(good_labels(dims), min_size=1, max_size=3))


bad_selectors = st.one_of(
    st.just([]),
    st.lists(bad_labels, min_size=1, max_size=3),
    st.sampled_from(["all", "ANY", "any ", "*"]),
    text,
)

good_ips = st.lists(
    st.one_of(
        st.integers(0, 60_000).map(
            lambda n: f"10.{9 + n // 60_000}.{n // 250 % 240}.{n % 250 + 1}"
        ),
        st.integers(1, 2**16).map(lambda n: f"fd00::{n:x}"),
        st.sampled_from(["10.9.0.1", "10.9.0.2", "fd00::1", "FD00:0:0::1", "::ffff:10.9.0.1"]),
    ),
    max_size=3,
)
# Addresses Python's ipaddress takes that a ruleset may not: scoped, mapped, special.
ODD_IPS = [
    "fe80::1%eth0",
    "fd00::1%1",
    "fe80::1%",
    "::ffff:10.9.0.1",
    "::ffff:127.0.0.1",
    "::10.9.0.1",
    "fe80::1",
    "169.254.1.1",
    "255.255.255.255",
    "10.9.0.0",
    "100.64.0.1",
    "2001:db8::1",
    "64:ff9b::a09:1",
    "fd00:0000:0000:0000:0000:0000:0000:0001",
]
odd_ips = st.tuples(good_ips, st.sampled_from(ODD_IPS)).map(lambda t: [*t[0], t[1]])

_BAD_IP = st.one_of(
    st.sampled_from(["fe80::1%eth0", "fd00::1%1", "127.0.0.1", "0.0.0.0", "::", "224.0.0.1"]),
    st.sampled_from(["10.0.0.300", "10.0.0.01", "10.0.0.1/24", "10.0.0.1 ", "1.2.3.4, 5.6.7.8"]),
    st.sampled_from(
        ["::1", "ff02::1", "10.0.0.1\n", "10.0.0.1; flush ruleset", "::ffff:127.0.0.1"]
    ),
    st.ip_addresses().map(str),
    text,
)
# One bad address among good ones, or too many.
bad_ips = st.one_of(
    st.tuples(good_ips, _BAD_IP, st.integers(0, 3)).map(
        lambda t: [*t[0][: t[2]], t[1], *t[0][t[2] :]]
    ),
    st.lists(good_ips.map(lambda x: x[0] if x else "10.9.0.9"), min_size=17, max_size=20),
)

# ---- JSON values and numbers ---------------------------------------------------------

EXTREME_NUMBERS = [
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
    1.5,
    -0.0,
    1e308,
    -1e308,
    5e-324,
]
numbers = st.one_of(st.sampled_from(EXTREME_NUMBERS), st.integers(), st.floats(allow_nan=False))
json_scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

# ---- values from msgspec types -------------------------------------------------------

Hints = Mapping[str, st.SearchStrategy[Any]]


@st.composite
def body(draw: st.DrawFn, t: Any, good: Hints, bad: Hints) -> Any:
    """JSON data for the msgspec struct `t`: each field from `good` (values the
    server should take), `bad` (hostile ones) or any value of its type.

    Mostly clean (so requests get past validation and reach the store), else
    with one bad field, else anything goes.
    """
    info = msgspec.inspect.type_info(t)
    assert isinstance(info, msgspec.inspect.StructType)
    mode = draw(st.sampled_from(["clean", "clean", "one_bad", "mixed"]))
    broken = draw(st.sampled_from([f.name for f in info.fields])) if mode == "one_bad" else ""
    out: dict[str, Any] = {}
    for f in info.fields:
        typed = _by_type(f.type)
        g, b = good.get(f.name), bad.get(f.name, typed)
        if mode == "mixed" or f.name == broken:
            strategy = st.one_of(b, typed) if g is None else st.one_of(g, b, typed)
        else:
            strategy = g if g is not None else typed
        if f.required or f.name == broken or draw(st.booleans()):
            out[f.encode_name] = draw(strategy, label=f.name)
    return out


def _by_type(info: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    mi = msgspec.inspect
    if isinstance(info, mi.StructType):
        fields = {f.encode_name: _by_type(f.type) for f in info.fields}
        return st.fixed_dictionaries({}, optional=fields)
    if isinstance(info, mi.StrType):
        return text
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.IntType):
        return st.one_of(
            st.integers(min_value=-5, max_value=100_000), st.sampled_from(EXTREME_NUMBERS)
        )
    if isinstance(info, mi.FloatType):
        return numbers
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(list(info.values))
    if isinstance(info, mi.ListType):
        return st.lists(_by_type(info.item_type), max_size=4)
    if isinstance(info, mi.DictType):
        return st.dictionaries(text, _by_type(info.value_type), max_size=4)
    if isinstance(info, mi.UnionType):
        return st.one_of([_by_type(t) for t in info.types])
    return json_values


# ---- mutations -----------------------------------------------------------------------

MUTATIONS = (
    "drop",
    "unknown",
    "retype",
    "huge",
    "raw",
    "raw",
    "raw",
    "unicode",
    "nul",
    "number",
    "null",
)
BYTE_MUTATIONS = ("flip", "truncate", "bad_utf8", "garbage_tail", "bom", "empty", "array", "dupkey")

# JSON text json.dumps cannot write, spliced in for a field's value.
RAW_VALUES = [
    b'"a\xffb"',  # not UTF-8
    b'"\xc0\xaf"',  # overlong UTF-8
    b'"\xed\xa0\x80"',  # a surrogate, UTF-8 encoded
    b'"\\ud800"',  # a lone surrogate escape
    b'"\\udc00x"',
    b'"\\u0000"',
    b"1" + b"0" * 400,
    b"-1" + b"0" * 30,
    b"1e999",
    b"-0",
    b"NaN",
    b"Infinity",
    b"0x10",
    b"01",
    b".5",
    b"1.",
    b"+1",
    b"[" * 64 + b"1" + b"]" * 64,
    b"[" * 20_000 + b"1" + b"]" * 20_000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"[" * 30_000,
    b'{"a": 1, "a": 2}',
    b"true false",
    b"\x00",
]
_SPLICE = "\x01splice:"
_SPLICE_RE = re.compile(rb'"\\u0001splice:([0-9]+)"')


@st.composite
def mutated(draw: st.DrawFn, value: Any, fields: tuple[str, ...] = ()) -> bytes:
    """`value` (a JSON object), damaged by one or more mutations, as body bytes."""
    obj: Any = dict(value) if isinstance(value, dict) else value
    names = tuple(fields) or (tuple(obj) if isinstance(obj, dict) else ())
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if not isinstance(obj, dict):
            break
        key = draw(st.sampled_from(names)) if names else "x"
        if kind == "drop" and obj:
            obj.pop(draw(st.sampled_from(sorted(obj))), None)
        elif kind == "unknown":
            name = draw(st.sampled_from(["x", "admin", "id", "uses", "__proto__", key.upper(), ""]))
            obj[name] = draw(json_values)
        elif kind == "retype":
            obj[key] = draw(json_values)
        elif kind == "huge":
            size = draw(st.sampled_from([256, 5000, 60_000, 70_000]))
            obj[key] = draw(st.sampled_from(["x", "é", "\x00", "a b"])) * size
        elif kind == "raw":
            obj[key] = f"{_SPLICE}{draw(st.integers(0, len(RAW_VALUES) - 1))}"
        elif kind == "unicode":
            obj[key] = draw(st.text(st.characters(exclude_categories=()), min_size=1, max_size=20))
        elif kind == "nul":
            obj[key] = draw(st.sampled_from(["\x00", "a\x00", "tcp/80\x00", "role\x00=db"]))
        elif kind == "number":
            obj[key] = draw(numbers)
        elif kind == "null":
            obj[key] = None
    # ensure_ascii=False writes lone surrogates as (invalid) UTF-8 bytes.
    data = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    data = _SPLICE_RE.sub(lambda m: RAW_VALUES[int(m.group(1))], data)
    for kind in draw(st.lists(st.sampled_from(BYTE_MUTATIONS), max_size=2)):
        data = _damage(draw, kind, data, obj)
    return data


def _damage(draw: st.DrawFn, kind: str, data: bytes, obj: Any) -> bytes:
    if kind == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "bad_utf8" and data:
        i = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
        return data[:i] + junk + data[i:]
    if kind == "garbage_tail":
        return data + draw(st.sampled_from([b" x", b"}", b"\x00", b"{}", b"\n\n{"]))
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"null", b"0", b'""', b"[]", b"{}"]))
    if kind == "array":
        return b"[" + data + b"]"
    if kind == "dupkey" and isinstance(obj, dict) and obj:
        key = draw(st.sampled_from(sorted(obj)))
        extra = json.dumps({key: draw(json_values)})[1:-1]
        first = draw(st.booleans())
        inner = data.strip()[1:-1]
        joined = (extra.encode() + b"," + inner) if first else (inner + b"," + extra.encode())
        return b"{" + joined.strip(b",") + b"}"
    return data


# ---- headers, queries, path parameters -----------------------------------------------

CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "*/*",
    "garbage",
]
header_text = st.one_of(
    st.sampled_from(["", " ", "x", "null", "0", "-1", "nan", "inf", "1e999", "A" * 4000]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
)
# Query values as they appear on the wire: percent-escapes included, undecodable ones too.
query_value = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "1000", "1001", "2", "0.01", "nan", "inf", "-inf"]),
    st.sampled_from(
        ["1e999", "-0", "%D9%A3", "1_0", "%205", "+5", "0x10", "%FF", "%00", "%0A", "%ED%A0%80"]
    ),
    st.sampled_from([str(2**62), str(2**62 + 1), str(2**64), "9" * 400]),
    st.integers().map(str),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#&%+"),
        max_size=20,
    ),
)
path_value = st.one_of(
    st.sampled_from(
        ["x", "nope", "%00", "%0A", "%FF", "%ED%A0%80", "%2F", "..", "%2E%2E", "a%20b"]
    ),
    st.sampled_from(["r_0000000000", "p_000000000000", "k_0000000000000000", "h_0000000000000000"]),
    st.sampled_from(["x" * 300, "%" + "41" * 3, "%C3%A9", "db'--", "$(reboot)"]),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"),
        min_size=1,
        max_size=20,
    ),
)

Resolver = Callable[[str], st.SearchStrategy[str]]
