"""A change whose transaction fails leaves nothing behind: store, compiler, versions
(the compiler only ever hears of committed changes)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from segd.config import ServerConfig
from tests.api.conftest import Admin, MakeAgent

RULE = {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]}
# The generation is written by the last statement of every commit that changes
# instructions: failing it fails the whole commit.
FAIL_VERSIONS = """
CREATE TRIGGER fail_versions BEFORE UPDATE ON generation
BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
"""


def _sql(cfg: ServerConfig, script: str) -> None:
    db = sqlite3.connect(Path(cfg.data_dir) / "segd.db")
    try:
        db.executescript(script)
    finally:
        db.close()


async def test_failed_commit_undoes_the_compiler_change(
    api: Admin, make_agent: MakeAgent, server_cfg: ServerConfig
) -> None:
    await api.ok("POST", "/v1/rules", RULE, status=201)
    db_key = await api.setup_policy(profile="db", labels={"role": "db"})
    web_key = await api.setup_policy(profile="web", labels={"role": "web"})
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()
    await b.join_mesh()
    _, on_b = await b.pair("web1", web_key, [b.ip(2)])
    before_b = await b.paired(on_b)
    before = await api.snapshot()

    # The pairing is decided and written, then its commit fails.
    _sql(server_cfg, FAIL_VERSIONS)
    status, body = await a.pair("db1", db_key, [a.ip(1)])
    assert status >= 400 and set(body) == {"error", "message"}
    assert await api.snapshot() == before  # no workload, no use, no version
    assert (await b.instructions(since=before_b.version))[0] == 204
    status, again = await b.instructions(since=0)
    assert b.open(again) == before_b  # the compiler forgot the failed workload

    _sql(server_cfg, "DROP TRIGGER fail_versions;")
    # B's next recompile must not see the workload that failed to pair.
    _, res = await b.pair("web2", web_key, [b.ip(3)])
    assert (await b.paired(res)).sets == before_b.sets
    status, res = await a.pair("db1", db_key, [a.ip(1)])
    assert status == 200, res
    status, signed = await b.instructions(since=before_b.version + 1)
    assert status == 200 and [a.ip(1)] in b.open(signed).sets.values()


async def test_failed_rule_change_is_undone(
    api: Admin, make_agent: MakeAgent, server_cfg: ServerConfig
) -> None:
    web_key = await api.setup_policy(profile="web", labels={"role": "web"})
    b = await make_agent("b")
    _, on_b = await b.pair("web1", web_key, ["10.0.0.2"])
    version = (await b.paired(on_b)).version
    _sql(server_cfg, FAIL_VERSIONS)
    status, _ = await api.call("POST", "/v1/rules", RULE)
    assert status >= 400
    assert await api.ok("GET", "/v1/rules") == []
    _sql(server_cfg, "DROP TRIGGER fail_versions;")
    assert (await b.instructions(since=version))[0] == 204
    # The next recompile of B must not pick up the half-applied rule either.
    _, res = await b.pair("web2", web_key, ["10.0.0.3"])
    instr = await b.paired(res)
    assert instr.version == version + 1 and instr.rules == []
