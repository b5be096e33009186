"""Config: the example documents every key and loads; bad files are refused
with the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from segd import config

EXAMPLE = Path(__file__).parents[2] / "segd.toml.example"


def _keys(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in msgspec.structs.fields(struct):
        t = f.type
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            out |= _keys(t, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def _example_keys(data: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict) and v and f"{prefix}{k}" != "orchestrator.container_labels":
            out |= _example_keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_example_loads_and_equals_defaults() -> None:
    assert config.load(EXAMPLE) == config.Config()


def test_example_documents_every_key() -> None:
    import tomllib

    documented = _example_keys(tomllib.loads(EXAMPLE.read_text()))
    assert documented == _keys(config.Config)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[server]\nlisten = 5", "server.listen", "Expected `str`, got `int`"),
        ('[server]\nlisten = "nope"', "server.listen", "invalid listen address"),
        ('[server]\nlisen = "x:1"', "server.lisen", "unknown key"),
        ("[servr]\n", "servr", "unknown key"),
        ("[server]\nmax_body_bytes = 1", "server.max_body_bytes", "between"),
        ("[server]\ndimensions = []", "server.dimensions", "at least one"),
        ('[server]\ndimensions = ["Role"]', "server.dimensions", "invalid label dimension"),
        ('[server.tls]\ncert = "/c.pem"', "server.tls.cert", "both cert and key"),
        ("[server.connections]\nmax_open = 1", "server.connections.max_open", "between"),
        (
            "[server.connections]\nheader_timeout_s = 0",
            "server.connections.header_timeout_s",
            "between",
        ),
        (
            "[orchestrator.connections]\nidle_timeout_s = -1",
            "orchestrator.connections.idle_timeout_s",
            "between",
        ),
        ('[agent]\nserver = "ftp://x"', "agent.server", "http:// or https://"),
        ("[agent]\nreconcile_interval_s = 0", "agent.reconcile_interval_s", "between"),
        ("[agent]\nflow_interval_s = 5", "agent.flow_interval_s", "between 15 and 60"),
        ('[agent]\nmetrics_listen = "0.0.0.0:9464"', "agent.metrics_listen", "loopback"),
        ('[agent]\nisolate_unkeyed = "yes"', "agent.isolate_unkeyed", "Expected `bool`"),
        ('[log]\nlevel = "loud"', "log.level", "Invalid enum value"),
        ('[orchestrator]\nlisten = "[::1]:99999"', "orchestrator.listen", "invalid listen"),
        ("server = 1", "server", "Expected `object`"),
    ],
)
def test_bad_config_names_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert e.value.path == str(p)
    assert e.value.key == key
    assert reason in e.value.reason
    assert str(p) in str(e.value) and key in str(e.value)


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[server\nlisten=")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(p)
    with pytest.raises(config.ConfigError, match="cannot read file"):
        config.load(tmp_path / "missing.toml")
