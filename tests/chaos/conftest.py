"""A whole local stack of its own for the chaos test (it kills things; no other test shares it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Stack, local_stack


@pytest.fixture(scope="module")
def chaos_stack() -> Iterator[Stack]:
    """Three 2-slot workers with a short worker timeout."""
    with local_stack("kiln-chaos-", workers=3, slots_per_worker=2, max_context_bytes=2 * 1024 * 1024) as s:
        yield s
