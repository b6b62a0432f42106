"""Searcher: turns experiments and validations into trial decisions."""

from __future__ import annotations

import asyncio

import msgspec
import structlog

from schemas import events as ev
from schemas import subjects
from services.runtime import (
    BusSettings,
    ConsumerSpec,
    DecisionShell,
    configure_logging,
    connect_bus,
    read_settings,
    stop_on_signals,
)
from services.searcher.core import SearcherCore

log = structlog.get_logger(__name__)

CONSUMER = ConsumerSpec(
    durable="searcher",
    stream=subjects.EVENTS,
    # The registry's facts too: a checkpoint registered as a model version is taken out of retention.
    filter_subjects=[subjects.EXPERIMENT_FACTS, subjects.TRIAL_FACTS, subjects.MODEL_FACTS],
)


class SearcherSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the searcher (``KILN_*`` environment variables)."""

    log_level: str = "INFO"


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(SearcherSettings)
    configure_logging("searcher", settings.log_level)
    stop = stop_on_signals()
    async with connect_bus(read_settings(BusSettings), "searcher", ensure=False) as bus:
        shell = DecisionShell(bus, "searcher", SearcherCore, SearcherCore.restore)
        await shell.load()
        log.info("searcher.ready", seq=shell.last_seq)
        await bus.consume(CONSUMER, msgspec.json.Decoder(ev.DomainEvent), shell.on_events, stop,
                           position=shell.position)


if __name__ == "__main__":
    asyncio.run(main())
