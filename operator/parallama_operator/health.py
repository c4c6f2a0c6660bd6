"""What a runtime pod says about the plan, and what the operator does about it (pure).

Two signals, both written by Kubernetes, none needing the runtime to hold credentials:

* ``OOMKilled``: the kernel killed the container for *host* memory (its cgroup limit). It says
  nothing about the GPUs: the answer is a higher memory request/limit (``status.hostReserveBytes``).
* the runtime's termination message (``parallama_runtime.termination``), kept by the kubelet in
  ``lastState.terminated.message``: ``reason=gpu-oom-load|gpu-oom-serving`` raise the GPU reserve
  (``status.extraReserveBytes``); ``unsupported-model`` and ``unreadable-file`` make the
  ModelDeployment Invalid until its spec changes; ``load-failed`` is reported and changes nothing.

The slots a runtime allocated need no signal of their own: the runtime is given its slot count
(``OLLAMA_NUM_PARALLEL``) and either allocates exactly that many or exits with ``gpu-oom-load``
(its ``/readyz`` body and ``parallama_slots_total`` say the count for humans and Prometheus), so a
Ready pod has its planned slots.

Each trouble carries a signature that stays the same however often the pod is re-read (pod UID,
container, restart count), so the operator acts on every incident exactly once, across restarts
too (the signatures are kept in status.troubles).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parallama_runtime.termination import Failure, FailureReason, parse_failure

from .builders import PLAN_HASH_ANNOTATION
from .planning import next_extra_reserve, next_host_reserve
from .resources import Phase, PlanStatus

__all__ = ["INVALID_REASONS", "Reaction", "Trouble", "react", "runtime_invalid", "runtime_troubles"]

OOM_KILLED = "OOMKilled"
INVALID_REASONS = {
    FailureReason.UNSUPPORTED_MODEL: "UnsupportedModel",
    FailureReason.UNREADABLE_FILE: "ModelUnreadable",
}
"""Runtime failures no plan can cure, and the status/event reason each gets."""
EVENT_REASONS = {
    FailureReason.GPU_OOM_LOAD: "GPUOutOfMemory",
    FailureReason.GPU_OOM_SERVING: "GPUOutOfMemory",
    FailureReason.LOAD_FAILED: "RuntimeFailed",
    **INVALID_REASONS,
}


@dataclass(frozen=True)
class Trouble:
    signature: str
    kind: str
    """``OOMKilled`` or a :class:`FailureReason` value."""
    message: str
    failure: Failure | None = None
    plan_hash: str | None = None
    """The plan the pod ran (its template annotation): a pod of an older plan says nothing about
    the current one."""


def runtime_troubles(pod: Mapping[str, Any]) -> list[Trouble]:
    meta = pod.get("metadata") or {}
    uid = meta.get("uid") or meta.get("name", "?")
    name = meta.get("name", "?")
    plan_hash = (meta.get("annotations") or {}).get(PLAN_HASH_ANNOTATION)
    troubles = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        container = status.get("name", "?")
        restarts = int(status.get("restartCount") or 0)
        for key, when in (("state", restarts), ("lastState", restarts - 1)):
            terminated = (status.get(key) or {}).get("terminated") or {}
            if not terminated:
                continue
            signature = f"{uid}/{container}/{max(when, 0)}"
            failure = parse_failure(str(terminated.get("message") or ""))
            if terminated.get("reason") == OOM_KILLED:
                # the kernel's verdict wins over anything the runtime managed to write first
                message = f"pod {name} container {container} was OOMKilled (host memory)"
                troubles.append(Trouble(f"{signature}/oom", OOM_KILLED, message, None, plan_hash))
            elif failure is not None:
                message = f"pod {name}: {failure.reason.value}: {failure.detail}"[:600]
                troubles.append(
                    Trouble(
                        f"{signature}/{failure.reason.value}",
                        failure.reason.value,
                        message,
                        failure,
                        plan_hash,
                    )
                )
    # the same termination shows in state and, after the restart, in lastState: keep one
    unique = {t.signature: t for t in troubles}
    return list(unique.values())


@dataclass(frozen=True)
class Reaction:
    """What the operator does about new troubles: the status fields to write, one event, and
    whether to re-plan."""

    status: dict[str, Any]
    event_reason: str
    event_message: str
    replan: bool
    invalid: bool = False
    """Phase Invalid (a Planned=False condition) rather than Degraded."""
    quiet: bool = False
    """Only pods of older plans failed: the signatures are recorded, nothing else changes."""


MiB = 1024 * 1024


def react(
    troubles: list[Trouble],
    status: Mapping[str, Any],
    *,
    generation: int | None,
    reserve_key: str,
    user_sets_memory: bool,
) -> Reaction:
    """Turn new troubles (not yet in status.troubles) into a reaction.

    * gpu-oom of a pod running the current plan: ``extraReserveBytes`` grows (bounded), re-plan;
    * OOMKilled of a pod running the current plan: ``hostReserveBytes`` grows (bounded) unless
      ``spec.resources`` sets the memory (then the event says to raise it), re-plan;
    * unsupported-model / unreadable-file: phase Invalid, ``runtimeFailure`` remembers it for this
      generation; no reserve, no re-plan;
    * load-failed, or a pod of an older plan: Degraded and an event, nothing else.
    """
    plan_dict = status.get("plan")
    plan = PlanStatus.model_validate(plan_dict) if plan_dict else None
    extra = int(status.get("extraReserveBytes") or 0)
    host = int(status.get("hostReserveBytes") or 0)
    current = [t for t in troubles if plan is None or t.plan_hash in (None, plan.hash)]
    notes: list[str] = []
    invalid = next((t for t in troubles if t.failure and t.failure.reason in INVALID_REASONS), None)
    update: dict[str, Any] = {
        "troubles": [*(status.get("troubles") or []), *(t.signature for t in troubles)][-20:],
        "oomKills": int(status.get("oomKills") or 0) + sum(1 for t in troubles if t.kind == OOM_KILLED),
    }
    if invalid is not None and invalid.failure is not None:
        reason = INVALID_REASONS[invalid.failure.reason]
        message = f"the runtime cannot serve this model: {invalid.message}"
        update.update(
            phase=Phase.INVALID.value,
            message=message,
            runtimeFailure={
                "reason": invalid.failure.reason.value,
                "message": message,
                "generation": generation,
            },
        )
        return Reaction(update, reason, message, replan=False, invalid=True)

    gpu_ooms = [t for t in current if t.failure and t.failure.reason.out_of_memory]
    host_ooms = [t for t in current if t.kind == OOM_KILLED]
    before_extra, before_host = extra, host
    for _ in gpu_ooms:
        extra = next_extra_reserve(extra, plan)
    if gpu_ooms and extra == before_extra:
        notes.append(
            f"the GPU reserve is at its cap ({extra // MiB} MiB): more reserve will not fix this plan"
        )
    elif gpu_ooms:
        notes.append(f"keeping {extra // MiB} MiB more free per GPU in the next plan")
    if host_ooms and user_sets_memory:
        notes.append("spec.resources sets the container's memory: raise it there")
    elif host_ooms:
        for _ in host_ooms:
            host = next_host_reserve(host, plan)
        if host == before_host:
            notes.append(f"the host memory reserve is at its cap ({host // MiB} MiB)")
        else:
            notes.append(f"asking for {host // MiB} MiB more host memory per pod")
    load_failures = [t for t in current if t.kind == FailureReason.LOAD_FAILED]
    if not (gpu_ooms or host_ooms or load_failures):
        return Reaction(update, "", "", replan=False, quiet=True)
    first = (gpu_ooms or host_ooms or load_failures)[0]
    reason = OOM_KILLED if first.kind == OOM_KILLED else EVENT_REASONS[FailureReason(first.kind)]
    message = "; ".join([first.message, *notes])
    changed = (extra, host) != (before_extra, before_host)
    update.update(phase=Phase.DEGRADED.value, message=message)
    if changed:
        update.update(extraReserveBytes=extra, hostReserveBytes=host, reserveKey=reserve_key)
    return Reaction(update, reason, message, replan=changed)


def runtime_invalid(status: Mapping[str, Any], generation: int | None) -> tuple[str, str] | None:
    """(reason, message) of a runtime failure no plan can cure, reported for this generation of the
    spec; None once the spec changed (the next pods get their chance)."""
    failure = status.get("runtimeFailure") or {}
    if not failure or failure.get("generation") != generation:
        return None
    try:
        reason = INVALID_REASONS[FailureReason(str(failure.get("reason")))]
    except (ValueError, KeyError):
        return None
    return reason, str(failure.get("message") or reason)


def unschedulable_reason(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's word on a Pending pod it could not place (``PodScheduled`` False, reason
    ``Unschedulable``), e.g. ``0/3 nodes are available: 3 Insufficient nvidia.com/gpu.``; else None."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return str(condition.get("message") or "the scheduler found no node")
    return None
