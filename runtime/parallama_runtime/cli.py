"""The ``parallama`` command: ``plan``, ``serve`` and ``operator``.

``plan`` lives here; ``serve`` and ``operator`` are thin doors into their modules, imported only when
chosen so that ``parallama plan`` works where neither llama.cpp nor kopf is installed.

Exit codes of ``plan`` (a contract, see docs/design.md): 0 fits, 3 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Sequence
from typing import TextIO

from .planning.gpu_catalog import GPU_CATALOG, lookup_gpu_memory_mib
from .planning.memory import KVCacheType
from .planning.model_info import ModelInfo, ModelSourceError, model_info_from_metadata, read_model_info
from .planning.planner import Node, Plan, PlanRequest, format_bytes, make_plan
from .planning.presets import PRESETS

__all__ = ["main", "parse_gpus", "resolve_model"]

EXIT_FITS, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 0, 2, 3

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB)$", re.IGNORECASE)
_UNITS = {"gib": 1024**3, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "tib": 1024**4, "tb": 10**12}


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"not a size: {text!r} (use e.g. 24GiB, 80GB, 46068MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_gpus(spec: str) -> list[Node]:
    """``8xL20``, ``2x24GiB``, ``L4``, ``1xL4,8xL20`` (one node each), ``cpu:64GiB`` or ``local``."""
    if spec == "local":
        from .local_inventory import local_nodes

        return local_nodes()
    nodes: list[Node] = []
    for index, item in enumerate(part.strip() for part in spec.split(",")):
        if not item:
            continue
        name = f"node-{index}"
        if item.lower().startswith("cpu"):
            _, _, size = item.partition(":")
            if size:
                ram = parse_size(size)
            else:
                from .local_inventory import host_memory_bytes

                ram = host_memory_bytes()
            nodes.append(Node(name=name, cpu_memory_bytes=ram))
            continue
        match = re.fullmatch(r"(?:(\d+)\s*[xX]\s*)?(.+)", item)
        assert match is not None  # the pattern accepts any non-empty text
        count = int(match.group(1) or 1)
        what = match.group(2)
        if _SIZE.match(what):
            memory, product = parse_size(what), what
        else:
            mib = lookup_gpu_memory_mib(what)
            if mib is None:
                known = ", ".join(sorted(GPU_CATALOG))
                raise UsageError(f"unknown GPU product {what!r}; known: {known}; or give a size like 2x24GiB")
            memory, product = mib * 1024**2, what
        if count < 1:
            raise UsageError(f"{item}: a node needs at least one GPU")
        nodes.append(Node(name=name, product=product, gpu_count=count, gpu_memory_bytes=memory))
    if not nodes:
        raise UsageError("--gpus names no node")
    return nodes


def resolve_model(source: str) -> ModelInfo:
    """A preset name, ``demo`` (the generated demo GGUF), a GGUF path or URL, or a metadata .json."""
    if source in PRESETS:
        return model_info_from_metadata(PRESETS[source], source=f"preset:{source}")
    if source == "demo":
        from .demo_model import cached_demo_model

        return read_model_info(str(cached_demo_model()))
    return read_model_info(source)


# --------------------------------------------------------------------------------------------------
# plan


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="llama-3.1-8b",
        help=f"GGUF path or http(s) URL, metadata .json, 'demo', or a preset: {', '.join(PRESETS)}",
    )
    parser.add_argument("--gpus", default="local", help="8xL20, 2x24GiB, 1xL4,8xL20, cpu:64GiB or local")
    parser.add_argument("--num-ctx", type=int, default=4096, help="tokens per slot (default 4096)")
    parser.add_argument("--parallel", type=int, default=None, help="exact slot count (default: auto)")
    parser.add_argument("--min-parallel", type=int, default=1)
    parser.add_argument("--max-parallel", type=int, default=None, help="auto's ceiling (default 4)")
    parser.add_argument("--profile", choices=["chat", "batch"], default=None)
    parser.add_argument("--kv-cache-type", choices=[t.value for t in KVCacheType], default="f16")
    parser.add_argument("--headroom", type=float, default=0.2, help="fraction of GPU memory kept free")
    parser.add_argument("--gpus-per-replica", type=int, default=None)
    parser.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--swa-full",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="full-size caches for sliding-window layers (default off, like llama-server)",
    )
    parser.add_argument("--output", choices=["table", "json"], default="table")


def _run_plan(args: argparse.Namespace, out: TextIO) -> int:
    try:
        request = PlanRequest(
            num_ctx=args.num_ctx,
            num_parallel=args.parallel,
            min_parallel=args.min_parallel,
            max_parallel=args.max_parallel,
            profile=args.profile,
            kv_cache_type=KVCacheType(args.kv_cache_type),
            headroom=args.headroom,
            gpus_per_replica=args.gpus_per_replica,
            flash_attention=args.flash_attention,
            swa_full=args.swa_full,
        )
        nodes = parse_gpus(args.gpus)
        model = resolve_model(args.model)
    except (UsageError, ModelSourceError) as error:
        print(f"parallama plan: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        print(f"parallama plan: invalid request: {_first_error(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    plan = make_plan(model, nodes, request)
    if args.output == "json":
        document = plan.model_dump(mode="json")
        document["model"] = {"name": model.name, "architecture": model.architecture, "source": model.source}
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        out.write(render_table(model, plan))
    if plan.refused:  # llama.cpp would refuse these settings on any hardware: the request is at fault
        return EXIT_BAD_INPUT
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def _first_error(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return str(error)


def _bar(used: int, usable: int, capacity: int, width: int = 40) -> str:
    """``[#######.....|   ]``: used, free within usable, the headroom mark, then headroom."""
    if capacity <= 0:
        return ""
    used_cells = min(width, round(width * used / capacity))
    usable_cells = min(width, round(width * usable / capacity))
    cells = []
    for i in range(width):
        if i < used_cells:
            cells.append("#" if i < usable_cells else "!")
        elif i == usable_cells:
            cells.append("|")
        else:
            cells.append("." if i < usable_cells else " ")
    return "[" + "".join(cells) + "]"


def _task(plan: Plan) -> str:
    if plan.task != "embed":
        return "generate (chat and completions)"
    return (
        f"embed ({plan.pooling} pooling): a slot embeds one input of up to {plan.num_ctx} tokens, "
        f"the slots' inputs in one batch; output buffer {format_bytes(plan.output_buffer_bytes)}"
        + (" of host memory" if plan.gpus_per_replica else "")
    )


def render_table(model: ModelInfo, plan: Plan) -> str:
    """A capacity report: verdict, memory per component, one bar per device."""
    gib = 1024**3
    lines = [
        f"model      {model.name or model.source} ({model.architecture}, {model.block_count} layers, "
        f"{format_bytes(model.size_bytes)})",
        f"task       {_task(plan)}",
        f"verdict    {'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.reason}",
        *(f"warning    {note}" for note in plan.warnings),
        f"slots      {plan.num_parallel} x {plan.num_ctx} tokens (KV {plan.kv_cache_type.value}"
        f"{'' if plan.kv_cache_type_v == plan.kv_cache_type else ', V ' + plan.kv_cache_type_v.value}, "
        f"{plan.kv_bytes_per_token} bytes/token, flash attention {'on' if plan.flash_attention else 'off'})",
        *(
            [
                f"swa cache  {plan.swa_cells_per_slot} of {plan.kv_cells_per_slot} cells on"
                " sliding-window layers (--swa-full keeps them all)"
            ]
            if 0 < plan.swa_cells_per_slot < plan.kv_cells_per_slot
            else []
        ),
        (
            f"replica    {plan.gpus_per_replica} GPU{'s' if plan.gpus_per_replica != 1 else ''}"
            + (f" of {plan.node_shape}" if plan.node_shape else "")
            if plan.gpus_per_replica
            else f"replica    CPU only{' on ' + plan.node_shape if plan.node_shape else ''}"
        )
        + (f" on {', '.join(plan.nodes)}" if plan.nodes else ""),
        "",
        f"{'component':<14}{'GiB':>10}",
    ]
    memory = plan.memory
    rows = [
        ("weights", memory.weights_bytes),
        ("kv cache", memory.kv_cache_bytes),
        ("  per slot", memory.kv_per_slot_bytes),
        ("compute", memory.compute_bytes),
        ("overhead", memory.overhead_bytes),
        ("total", memory.total_bytes),
        ("usable", memory.usable_bytes),
        (f"headroom {memory.headroom_fraction:.0%}", memory.headroom_bytes),
    ]
    lines += [f"{name:<14}{value / gib:>10.2f}" for name, value in rows]
    if plan.devices:
        lines += ["", f"{'device':<8}{'layers':>7}{'used GiB':>10}{'usable':>8}  # used, | headroom starts"]
        for device in plan.devices:
            lines.append(
                f"{device.device:<8}{device.layers:>7}{device.total_bytes / gib:>10.2f}"
                f"{device.usable_bytes / gib:>8.2f}  "
                + _bar(device.total_bytes, device.usable_bytes, device.capacity_bytes)
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------


_DOORS = {
    "serve": ("parallama_runtime.serve", "run the model server (OpenAI and Ollama APIs, /metrics)"),
    "operator": ("parallama_operator.main", "run the Kubernetes operator"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="size slots and GPUs for a model", description=make_plan.__doc__)
    _add_plan_arguments(plan)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in _DOORS.items():
        door = sub.add_parser(name, help=help_text)
        if chosen == name:  # import the heavy module only when it is the one asked for
            importlib.import_module(module_name).add_arguments(door)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _run_plan(args, sys.stdout)
    module = importlib.import_module(_DOORS[args.command][0])
    result: int = module.run(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
