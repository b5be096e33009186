"""The orchestrator store: migrations, persistence, integrity, one owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from segd.errors import Conflict
from segd.orchestrator import wire
from segd.orchestrator.migrations import MIGRATIONS
from segd.orchestrator.model import ContainerRecord, ProfileRecord
from segd.orchestrator.store import Store
from tests.orchestrator.conftest import KEY

PROFILE = ProfileRecord(
    "web", "img", ["sh"], {"A": "1"}, ["bridge"], {"role": "web"}, KEY, "d", 1.0
)
NODE = wire.Node("n1", "tcp://h:1", "", "", "", 1.0)


async def test_migrated_and_persistent(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    store = await Store.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        await store.insert_profile(PROFILE)
        await store.insert_node(NODE)
        await store.insert_container(ContainerRecord("c" * 64, "web-1", "n1", "web", 2.0))
    finally:
        await store.close()
    store = await Store.open(path)
    try:
        assert await store.profile("web") == PROFILE
        assert await store.nodes() == [NODE]
        [c] = await store.containers()
        assert (c.node, c.profile, c.name) == ("n1", "web", "web-1")
        assert [x.id for x in await store.find_containers("cccc")] == ["c" * 64]
        assert await store.find_containers("web-1") == [c]
        assert await store.find_containers("dddd") == []
    finally:
        await store.close()


async def test_profiles_and_nodes_in_use_are_kept(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "o.db")
    try:
        await store.insert_profile(PROFILE)
        await store.insert_node(NODE)
        await store.insert_container(ContainerRecord("c" * 64, "web-1", "n1", "web", 2.0))
        with pytest.raises(Conflict):
            await store.delete_profile("web")
        with pytest.raises(Conflict):
            await store.delete_node("n1")
        with pytest.raises(Conflict):  # unknown node: no dangling record
            await store.insert_container(ContainerRecord("d" * 64, "x", "nope", "web", 2.0))
        await store.replace_container(
            "c" * 64, ContainerRecord("e" * 64, "web-2", "n1", "web", 3.0)
        )
        assert [c.id for c in await store.containers()] == ["e" * 64]
        assert await store.delete_container("e" * 64)
        assert await store.delete_profile("web") and await store.delete_node("n1")
    finally:
        await store.close()


async def test_local_node_is_registered_once(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "o.db")
    try:
        assert await store.insert_node_once("m", NODE)
        assert await store.delete_node("n1")
        assert not await store.insert_node_once("m", NODE)
        assert await store.nodes() == []
    finally:
        await store.close()


async def test_one_owner_per_data_dir(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "o.db")
    try:
        with pytest.raises(Conflict, match="another segd orchestrator"):
            await Store.open(tmp_path / "o.db")
    finally:
        await store.close()
    await (await Store.open(tmp_path / "o.db")).close()
