"""The flow store's pages seek to their cursor instead of scanning to it."""

from __future__ import annotations

import random
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
    sql, params = flowstore.page_query(flt, 10, (1_800_000_000.0, 42))
    plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert plan == [f"SEARCH flows USING INDEX {index} {seek}"]


def test_a_workload_at_either_end_is_two_seeks_not_a_sort_of_every_match() -> None:
    conn = sqlite3.connect(":memory:")
    sqlite.migrate(conn, flowstore.MIGRATIONS)
    sql, params = flowstore.page_query(FlowFilter(workload="w_1"), 10, (1_800_000_000.0, 42))
    plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert "SEARCH flows USING INDEX flows_src_workload (src_workload=? AND last_seen<?)" in plan
    assert "SEARCH flows USING INDEX flows_dst_workload (dst_workload=? AND last_seen<?)" in plan
    assert not any(step.startswith("MULTI-INDEX") for step in plan), plan


def test_the_two_seeks_answer_what_the_or_of_both_ends_does() -> None:
    """Against `(src_workload = ? OR dst_workload = ?)`, on random flows and
    pages: the same ids in the same order, a flow with the workload at both
    ends once."""
    conn = sqlite3.connect(":memory:")
    sqlite.migrate(conn, flowstore.MIGRATIONS)
    rnd = random.Random(7)
    columns = [c.strip() for c in flowstore._COLUMNS.split(",")]
    for _ in range(1500):
        seen = float(rnd.randint(0, 300))
        row: dict[str, object] = dict.fromkeys(columns, "")
        row |= {
            "src_workload": rnd.choice(["w1", "w2", ""]),
            "dst_workload": rnd.choice(["w1", "w2", ""]),
            "verdict": rnd.choice(["allowed", "blocked"]),
            "port": 1,
            **dict.fromkeys(("connections", "packets", "bytes"), 1),
            **dict.fromkeys(("first_seen", "last_seen"), seen),
        }
        marks = ", ".join("?" * len(columns))
        conn.execute(
            f"INSERT INTO flows ({flowstore._COLUMNS}) VALUES ({marks})",
            [row[c] for c in columns],
        )
    for _ in range(200):
        flt = FlowFilter(
            workload=rnd.choice(["w1", "w2"]),
            verdict=rnd.choice(["", "blocked"]),
            since=rnd.choice([None, 100.0]),
        )
        cursor = rnd.choice([None, (float(rnd.randint(0, 300)), rnd.randint(1, 1500))])
        limit = rnd.randint(1, 40)
        clause, params = flowstore.where(flt, cursor)
        either = f"SELECT id FROM flows{clause} ORDER BY last_seen DESC, id DESC LIMIT ?"
        sql, seek_params = flowstore.page_query(flt, limit, cursor)
        want = [r[0] for r in conn.execute(either, (*params, limit))]
        assert [r[0] for r in conn.execute(sql, seek_params)] == want, (flt, cursor, limit)
