"""The flow store's pages seek to their cursor instead of scanning to it."""

from __future__ import annotations

import sqlite3

import pytest

from segd import sqlite
from segd.server import flowstore
from segd.server.flowquery import FlowFilter


@pytest.mark.parametrize(
    ("flt", "index", "seek"),
    [
        (FlowFilter(), "flows_time", "(last_seen<?)"),
        (FlowFilter(since=0.0), "flows_time", "(last_seen>? AND last_seen<?)"),
        (FlowFilter(verdict="blocked"), "flows_verdict", "(verdict=? AND last_seen<?)"),
    ],
    ids=["no filter", "since", "verdict"],
)
def test_a_page_after_a_cursor_seeks_to_it(flt: FlowFilter, index: str, seek: str) -> None:
    conn = sqlite3.connect(":memory:")
    sqlite.migrate(conn, flowstore.MIGRATIONS)
    clause, params = flowstore.where(flt, (1_800_000_000.0, 42))
    sql = f"SELECT * FROM flows{clause} ORDER BY last_seen DESC, id DESC LIMIT ?"
    plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (*params, 10))]
    assert plan == [f"SEARCH flows USING INDEX {index} {seek}"]
