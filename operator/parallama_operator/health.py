"""What a runtime pod says about the plan (pure): OOM kills and fewer slots than planned.

A runtime that cannot allocate its planned slots says so in its termination message (see
``parallama_runtime.termination``); one that runs with fewer slots may say so in the pod annotation
``parallama.dev/slots``.

Each trouble carries a signature that stays the same however often the pod is re-read (pod UID,
container, restart count), so the operator acts on every incident exactly once, across restarts
too (the signatures are kept in status.troubles).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parallama_runtime.termination import parse_allocation_failure

from .builders import SLOTS_ANNOTATION

__all__ = ["Trouble", "runtime_troubles"]


@dataclass(frozen=True)
class Trouble:
    signature: str
    reason: str
    message: str


def runtime_troubles(pod: Mapping[str, Any], planned_slots: int | None) -> list[Trouble]:
    meta = pod.get("metadata") or {}
    uid = meta.get("uid") or meta.get("name", "?")
    name = meta.get("name", "?")
    troubles = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        container = status.get("name", "?")
        restarts = int(status.get("restartCount") or 0)
        for key, when in (("state", restarts), ("lastState", restarts - 1)):
            terminated = (status.get(key) or {}).get("terminated") or {}
            failed = parse_allocation_failure(str(terminated.get("message") or ""))
            if failed is not None:
                troubles.append(
                    Trouble(
                        signature=f"{uid}/{container}/{max(when, 0)}/allocation",
                        reason="SlotsBelowPlan",
                        message=f"pod {name} could not allocate {failed[0]} slots of {failed[1]} tokens: "
                        + str(terminated.get("message"))[:300],
                    )
                )
            elif terminated.get("reason") == "OOMKilled":
                troubles.append(
                    Trouble(
                        signature=f"{uid}/{container}/{max(when, 0)}/oom",
                        reason="OOMKilled",
                        message=f"pod {name} container {container} was OOMKilled",
                    )
                )
    annotation = (meta.get("annotations") or {}).get(SLOTS_ANNOTATION)
    if planned_slots is not None and annotation is not None:
        try:
            slots = int(annotation)
        except ValueError:
            slots = None
        if slots is not None and slots < planned_slots:
            troubles.append(
                Trouble(
                    signature=f"{uid}/slots/{slots}",
                    reason="SlotsBelowPlan",
                    message=f"pod {name} allocated {slots} slots, {planned_slots} were planned",
                )
            )
    # the same kill can show in state and, after the restart, in lastState: keep one
    unique = {t.signature: t for t in troubles}
    return list(unique.values())
