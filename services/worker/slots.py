"""What a worker can offer: its GPUs from NVML, or CPU slots when NVML does not load."""

from __future__ import annotations

import structlog

from schemas.events import Slot

log = structlog.get_logger(__name__)


def discover(cpu_slots: int) -> list[Slot]:
    """GPU slots when NVML loads and sees devices, else ``cpu_slots`` CPU slots.

    NVML failing to load is the normal case on a machine without NVIDIA drivers, not an error.
    """
    gpus = _nvml_slots()
    if gpus:
        return gpus
    return [Slot(slot_id=f"cpu{i}", kind="cpu", name="cpu") for i in range(cpu_slots)]


def _nvml_slots() -> list[Slot]:
    try:
        import pynvml  # nvidia-ml-py; imported here so importing this module never touches NVML
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("worker.nvml_unavailable", reason=str(exc))
        return []
    try:
        slots = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = 0
            slots.append(
                Slot(
                    slot_id=f"cuda{i}",
                    kind="cuda",
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    memory_mb=int(memory.total) // (1024 * 1024),
                    utilization=utilization,
                )
            )
        return slots
    finally:
        pynvml.nvmlShutdown()
