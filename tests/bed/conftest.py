"""Tests of the multi-host test bed itself (root, Docker, several dockerd)."""

from tests.bed.fixtures import bed

__all__ = ["bed"]
