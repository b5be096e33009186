"""Every invalid config file is refused with the file, the key and the reason,
before anything starts.

The cases come from the msgspec `Config` types, so a new key is covered
without touching this file: an unknown key in every table, a wrong type for
every key and every table, a missing value for every required key, and for
every key a pool of suspicious values of its own type; a key that refuses any
of them must have an entry in `BAD_VALUES`. Syntax errors come from damaging
the example file. A sample goes through `python -m segd MODE --config BAD`:
exit code 2, one line on stderr naming the file and the key, no data dir.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segd import config
from tests.fuzz import strategies as fz

EXAMPLE = Path(__file__).parents[2] / "segd.toml.example"
REPO = Path(__file__).parents[2]
mi = msgspec.inspect

# ---- the keys, from the types ---------------------------------------------------------


def _fields(
    info: mi.StructType, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], mi.Field]]:
    for f in info.fields:
        yield (*prefix, f.encode_name), f
        if isinstance(f.type, mi.StructType):
            yield from _fields(f.type, (*prefix, f.encode_name))


ROOT = mi.type_info(config.Config)
assert isinstance(ROOT, mi.StructType)
FIELDS = list(_fields(ROOT))
LEAVES = [(path, f) for path, f in FIELDS if not isinstance(f.type, mi.StructType)]
TABLES = [()] + [path for path, f in FIELDS if isinstance(f.type, mi.StructType)]
REQUIRED = [path for path, f in FIELDS if f.required]


def key(path: tuple[str, ...]) -> str:
    return ".".join(path)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, datetime.datetime | datetime.date):
        return v.isoformat()
    raise TypeError(v)


def toml_setting(path: tuple[str, ...], v: Any) -> str:
    """`[table]` + `key = value` setting `path` to `v`."""
    *table, name = path
    head = f"[{'.'.join(table)}]\n" if table else ""
    return f"{head}{json.dumps(name)} = {toml_value(v)}\n"


# Values of a wrong type for each kind of key.
WRONG: dict[type, list[Any]] = {
    mi.StrType: [5, True, ["x"], {"a": "b"}, 1.5, datetime.date(1979, 5, 27)],
    mi.IntType: ["1024", 1.5, True, [1], {"a": 1}],
    mi.FloatType: ["1", True, [1.0], {"a": 1}, datetime.datetime(1979, 5, 27, 7, 32)],
    mi.BoolType: ["true", 1, [True], 0.0],
    mi.ListType: ["x", 1, [1], [["x"]], {"a": "b"}],
    mi.DictType: ["x", 1, ["x"], {"a": 1}, {"a": {"b": "c"}}],
    mi.LiteralType: [5, True, ["info"], "no-such-value"],
    mi.StructType: [5, "x", [1], True],
}
# Suspicious values of the right type for each kind of key: some keys take
# them, some must refuse them (those are listed in BAD_VALUES).
POOL: dict[type, list[Any]] = {
    mi.StrType: [
        "",
        " ",
        "x",
        "a\x00b",
        "a\nb",
        "relative/dir",
        "x" * 5000,
        "http://",
        "ftp://host",
        "host:0",
        "host:99999",
        "[::1]:1",
        "unix:///x",
    ],
    mi.IntType: [0, -1, 1, 1023, 16 * 1024 * 1024 + 1, -(2**63)],
    mi.FloatType: [0.0, -1.0, 0.05, 0.5, 3601.0, 1e9, math.nan, math.inf, -math.inf],
    mi.BoolType: [],
    mi.ListType: [[], [""], ["Role"], ["a", "a"], [f"d{i}" for i in range(17)], ["x" * 40]],
    mi.DictType: [{"": "x"}, {"segd.label.role": "db"}, {"segd.pairing-key": "k"}, {"a": "b"}],
    mi.LiteralType: [],
}

# key -> values its validator must refuse (each key that refuses anything in POOL).
BAD_VALUES: dict[str, list[Any]] = {
    "server.listen": ["", "nope", "host:0", "host:65536", "[::1]", ":80", "h:80\n", "h:٨٠"],
    "server.data_dir": ["", "a\x00b"],
    "server.max_body_bytes": [0, 1023, 16 * 1024 * 1024 + 1, -1],
    "server.request_skew_s": [0.0, 0.5, 3601.0, math.nan, math.inf],
    "server.request_future_skew_s": [-1.0, -0.001, 30.5, math.nan, math.inf],
    "server.rate_limit_per_s": [0.0, 0.001, -1.0, 1e9, math.nan, math.inf],
    "server.rate_limit_burst": [0, -1, 1_000_001],
    "server.audit_retention_days": [-1, 36501],
    "server.longpoll_timeout_s": [0.0, 301.0, math.nan, -math.inf],
    "server.dimensions": [[], ["Role"], ["a", "a"], [f"d{i}" for i in range(17)], ["r\n"]],
    "server.tls.cert": ["/c.pem", "a\x00b"],
    "server.tls.key": ["/k.pem", "a\x00b"],
    "server.tls.client_ca": ["a\x00b"],
    "server.connections.max_open": [0, 15, -1, 1_000_001],
    "server.connections.idle_timeout_s": [0.0, 0.5, 3601.0, math.nan, math.inf],
    "server.connections.header_timeout_s": [0.0, 0.4, 301.0, math.nan, -math.inf],
    "server.connections.body_timeout_s": [0.0, -1.0, 3601.0, math.nan],
    "server.flows.retention_days": [-1, 3651, 16777217],
    "server.flows.rollup_after_hours": [-1, 87601],
    "server.flows.max_stream_clients": [0, -1, 10_001],
    "server.flows.max_records_per_s": [-1, 10_000_001],
    "agent.server": ["", "ftp://x", "127.0.0.1:7400"],
    "agent.state_dir": ["", "a\x00b"],
    "agent.hostname": ["a b", "h\n", "-h", "x" * 254, "h;reboot"],
    "agent.server_ca": ["a\x00b"],
    "agent.reconcile_interval_s": [0.0, 0.4, 3601.0, math.nan],
    "agent.backoff_max_s": [0.0, 0.05, 601.0, math.inf],
    "agent.flow_interval_s": [0.0, 14.9, 60.5, math.nan, math.inf],
    "agent.metrics_listen": ["x", "0.0.0.0:9464", "10.0.0.1:9464", "[::]:9464", "127.0.0.1:0"],
    "orchestrator.listen": ["", "x", "[::1]:99999"],
    "orchestrator.data_dir": ["", "a\x00b"],
    "orchestrator.max_body_bytes": [1, 16 * 1024 * 1024 + 1],
    "orchestrator.rate_limit_per_s": [0.0, -1.0, math.nan],
    "orchestrator.rate_limit_burst": [0, 1_000_001],
    "orchestrator.dimensions": [[], ["Role"]],
    "orchestrator.tls.cert": ["/c.pem", "a\x00b"],
    "orchestrator.tls.key": ["/k.pem", "a\x00b"],
    "orchestrator.tls.client_ca": ["a\x00b"],
    "orchestrator.connections.max_open": [0, 1_000_001],
    "orchestrator.connections.idle_timeout_s": [0.0, math.nan],
    "orchestrator.connections.header_timeout_s": [301.0, math.inf],
    "orchestrator.connections.body_timeout_s": [-1.0, math.nan],
    "orchestrator.container_labels": [
        {"": "x"},
        {"segd.pairing-key": "k"},
        {"segd.label.role": "db"},
        {"segd.orch.x": "y"},
    ],
    "log.level": ["loud", "INFO"],
    "log.format": ["xml", ""],
}


def _kind(t: mi.Type) -> type:
    return type(t)


def _load(tmp_path: Path, text: str | bytes, name: str = "bad.toml") -> config.ConfigError:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with pytest.raises(config.ConfigError) as info:
        config.load(p)
    err = info.value
    assert err.path == str(p)
    message = str(err)
    assert message.isprintable() and len(message.splitlines()) == 1, message
    assert str(p) in message and err.reason, message
    if err.key:
        assert f"key '{err.key}'" in message or repr(err.key)[1:-1] in message, message
    return err


def _names(reported: str, path: tuple[str, ...]) -> bool:
    """The key, or an element of it (`server.dimensions[0]`, `x.labels[...]`)."""
    return reported == key(path) or reported.startswith(key(path) + "[")


def _same_table(reported: str, path: tuple[str, ...]) -> bool:
    """The key named, or a sibling in its table (a check across keys names one of them)."""
    return _names(reported, path) or reported.rsplit(".", 1)[0] == key(path[:-1])


# ---- tests ---------------------------------------------------------------------------


def test_the_cases_cover_every_key() -> None:
    assert {key(p) for p, _ in LEAVES} >= set(BAD_VALUES)
    assert TABLES and LEAVES and REQUIRED == []  # no required key today; see below


@pytest.mark.parametrize("table", TABLES, ids=lambda t: key(t) or "(top)")
def test_an_unknown_key_in_any_table_is_refused(tmp_path: Path, table: tuple[str, ...]) -> None:
    err = _load(tmp_path, toml_setting((*table, "no_such_key"), 1))
    assert (err.key, err.reason) == (key((*table, "no_such_key")), "unknown key")


@pytest.mark.parametrize(("path", "field"), FIELDS, ids=[key(p) for p, _ in FIELDS])
def test_a_wrong_type_for_any_key_is_refused(
    tmp_path: Path, path: tuple[str, ...], field: mi.Field
) -> None:
    for value in WRONG[_kind(field.type)]:
        err = _load(tmp_path, toml_setting(path, value))
        assert _names(err.key, path), (value, err)
        assert "Expected" in err.reason or "Invalid enum value" in err.reason, (value, err)


def test_every_required_key_when_missing_is_refused(tmp_path: Path) -> None:
    for path in REQUIRED:  # none today: every key has a default
        text = "".join(toml_setting(p, f.default) for p, f in LEAVES if p != path)
        err = _load(tmp_path, text)
        assert err.key == key(path)


@pytest.mark.parametrize(("path", "field"), LEAVES, ids=[key(p) for p, _ in LEAVES])
def test_suspicious_values_are_taken_or_refused_by_name(
    tmp_path: Path, path: tuple[str, ...], field: mi.Field
) -> None:
    """Any key that refuses one of the pool's values must list bad values in BAD_VALUES."""
    refused = []
    for value in POOL[_kind(field.type)]:
        try:
            config.decode(_nested(path, value), "x.toml")
        except config.ConfigError:
            refused.append(value)
            err = _load(tmp_path, toml_setting(path, value))
            assert _same_table(err.key, path), (value, err)
    if refused:
        assert key(path) in BAD_VALUES, f"{key(path)} refuses {refused!r}: add it to BAD_VALUES"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_for_any_validated_key_is_refused(tmp_path: Path, name: str) -> None:
    path = tuple(name.split("."))
    for value in BAD_VALUES[name]:
        err = _load(tmp_path, toml_setting(path, value))
        assert _same_table(err.key, path), (value, err)


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("not UTF-8", b'[server]\nlisten = "\xff"\n'),
        ("deep nesting", b"a = " + b"[" * 5000 + b"1" + b"]" * 5000 + b"\n"),
        ("newline in a key", b'"a\\nb" = 1\n'),
        ("NUL in a string", b'[server]\ndata_dir = "a\\u0000b"\n'),
        ("unterminated table", b"[server\nlisten = 1\n"),
        ("duplicate key", b'[server]\nlisten = "a:1"\nlisten = "a:1"\n'),
        ("duplicate table", b"[server]\n[server]\n"),
        ("bad escape", b'[server]\nlisten = "\\q"\n'),
        ("control character", b'[server]\nlisten = "a\x01"\n'),
        ("invalid date", b"[server]\nlisten = 1979-02-30\n"),
        ("lone surrogate escape", b'[server]\nlisten = "\\ud800"\n'),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, name: str, text: bytes) -> None:
    _load(tmp_path, text)


# ---- damaged example files and random text --------------------------------------------


@st.composite
def damaged_example(draw: st.DrawFn) -> str:
    text = EXAMPLE.read_text()
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "dup_line", "swap", "replace_line"]))
        if kind == "delete" and text:
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + text[i + draw(st.integers(1, 20)) :]
        elif kind == "insert":
            i = draw(st.integers(0, len(text)))
            junk = draw(
                st.one_of(st.sampled_from(['"', "[", "]", "=", "\n", "\\", "#", "{", ","]), fz.text)
            )
            text = text[:i] + junk + text[i:]
        elif kind == "dup_line" and lines:
            line = draw(st.sampled_from(lines))
            text = text + line
        elif kind == "swap" and len(lines) > 1:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        elif kind == "replace_line" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.from_regex(r"[a-z_.\[\]]{1,20} = .{0,20}\n", fullmatch=True))
            text = "".join(lines)
    return text


def _loads_or_refuses(tmp_path: Path, text: str) -> None:
    p = tmp_path / "fuzz.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config.load(p)
    except config.ConfigError as e:
        message = str(e)
        assert message.isprintable() and len(message.splitlines()) == 1, message
        assert e.path == str(p) and e.reason, message


@fz.fast(300)
@given(text=damaged_example())
def test_a_damaged_example_loads_or_is_refused(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _loads_or_refuses(tmp_path_factory.mktemp("cfg"), text)


@fz.fast(200)
@given(text=st.one_of(fz.text, st.text(st.sampled_from('[]{}="\n.,#ab1 \\'), max_size=60)))
def test_random_text_loads_or_is_refused(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _loads_or_refuses(tmp_path_factory.mktemp("cfg"), text)


@pytest.mark.slow
@fz.slow(5000)
@given(text=damaged_example())
def test_a_damaged_example_loads_or_is_refused_long(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _loads_or_refuses(tmp_path_factory.mktemp("cfg"), text)


# ---- the daemons refuse to start ------------------------------------------------------

SAMPLE: list[tuple[str, str, bytes, str]] = [
    # (mode, name, file contents, the key the error must name or "")
    ("server", "unknown key", b"[server]\nlisen = 1\n", "server.lisen"),
    ("server", "wrong type", b"[server]\nmax_body_bytes = \"big\"\n", "server.max_body_bytes"),
    ("server", "bad value", b"[server]\nrequest_skew_s = 0\n", "server.request_skew_s"),
    ("server", "syntax", b"[server\n", ""),
    ("server", "not UTF-8", b"[server]\nlisten = \"\xff\"\n", ""),
    ("server", "NUL in a path", b'[server]\ndata_dir = "a\\u0000b"\n', "server.data_dir"),
    ("agent", "unknown table", b"[agnet]\n", "agnet"),
    ("agent", "bad value", b'[agent]\nserver = "ftp://x"\n', "agent.server"),
    ("agent", "wrong type", b"[agent]\nisolate_unkeyed = 1\n", "agent.isolate_unkeyed"),
    ("orchestrator", "bad value", b'[orchestrator.container_labels]\n"segd.label.x" = "y"\n',
     "orchestrator.container_labels"),
    ("orchestrator", "wrong type", b"[orchestrator]\ndimensions = \"role\"\n",
     "orchestrator.dimensions"),
    ("orchestrator", "deep nesting", b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n", ""),
]  # fmt: skip


def _start(
    tmp_path: Path, mode: str, name: str, text: bytes
) -> tuple[subprocess.Popen[str], Path, Path]:
    case = tmp_path / name.replace(" ", "_")
    case.mkdir()
    cfg = case / "segd.toml"
    cfg.write_bytes(text)
    data = case / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segd", mode, "--config", str(cfg), "--data-dir", str(data)],
        cwd=case,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, cfg, data


def test_the_daemons_refuse_bad_config_files_before_starting(tmp_path: Path) -> None:
    started = [(c, *_start(tmp_path, c[0], f"{c[0]}-{c[1]}", c[2])) for c in SAMPLE]
    failures = []
    for (mode, name, _, expected_key), proc, cfg, data in started:
        out, err = proc.communicate(timeout=60)
        lines = err.splitlines()
        ok = (
            proc.returncode == 2
            and len(lines) == 1
            and str(cfg) in lines[0]
            and (not expected_key or f"key '{expected_key}'" in lines[0])
            and not data.exists()
            and sorted(p.name for p in cfg.parent.iterdir()) == ["segd.toml"]
        )
        if not ok:
            failures.append((mode, name, proc.returncode, err[-500:], out[-200:]))
    assert failures == []


def test_a_missing_tls_file_is_refused_before_starting(tmp_path: Path) -> None:
    text = (
        b'[server]\nlisten = "127.0.0.1:1"\n'
        b'[server.tls]\ncert = "/nonexistent/c.pem"\nkey = "/nonexistent/k.pem"\n'
    )
    proc, cfg, data = _start(tmp_path, "server", "tls", text)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-500:]
    assert len(err.splitlines()) == 1 and "server.tls.cert" in err and str(cfg) in err
    assert not data.exists()


def test_the_example_is_still_a_valid_config() -> None:
    assert config.load(EXAMPLE) == config.Config()
    assert REPO.joinpath("segd.toml.example").is_file()


@fz.fast(200)
@given(name=st.one_of(fz.text, fz.near(st.just("host-1")), st.from_regex(r"[a-z0-9.-]{1,300}")))
def test_the_config_takes_the_hostnames_the_server_takes(name: str) -> None:
    from segd.errors import InvalidInput
    from segd.server import validate

    try:
        validate.hostname(name)
        server_takes = True
    except InvalidInput:
        server_takes = False
    try:
        config.decode({"agent": {"hostname": name}})
        config_takes = True
    except config.ConfigError:
        config_takes = False
    assert config_takes == (server_takes or name == "")
