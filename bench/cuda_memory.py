"""Planned against measured GPU memory, with a CUDA build of llama.cpp (run where a GPU is at hand).

For every generated model family (tests/support/families) and two llama shapes of realistic width,
over a small matrix of settings, this loads the model fully offloaded to GPU 0, creates the context
exactly as the runtime does, and compares the memory model's per-device plan with what llama.cpp
reports for CUDA0 (model, KV, recurrent state, compute buffers) and with what the driver says the
process holds (NVML; the rest is the CUDA context and allocator overhead the plan budgets as
``overhead``).

    PYTHONPATH=runtime:tests python bench/cuda_memory.py --out cuda-memory.json   # on the GPU machine
    PYTHONPATH=runtime:tests python bench/cuda_memory.py --compare cuda-memory.json  # anywhere, later

The measurements are saved with the settings, so the comparison can be redone with a newer memory
model without a GPU: the generated models are seeded, the same bytes on every machine.

Not part of CI: CI has no GPU. The CPU matrix in tests/memory is the bar; this shows how far it
carries to CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _nvml_process_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no driver: measured by llama.cpp's reports alone
        return None
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == os.getpid():
            return int(process.usedGpuMemory or 0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="cuda-memory.json")
    parser.add_argument("--families", default="", help="comma list of family names (default: all)")
    parser.add_argument("--compare", default="", help="a saved measurement: print it against today's plan")
    args = parser.parse_args()
    if args.compare:
        return compare(json.loads(Path(args.compare).read_text()))

    import llama_cpp
    from parallama_runtime.demo_model import BENCH_SHAPE, DEMO_SHAPE, write_model
    from parallama_runtime.engine.llama_log import LlamaLogCapture, parse_buffer_reports
    from parallama_runtime.planning.memory import KVCacheType, MemoryConfig, context_refusal, estimate_memory
    from parallama_runtime.planning.model_info import model_info_from_gguf
    from support.families import load_all

    capture = LlamaLogCapture.install()
    llama_cpp.llama_backend_init()
    workdir = Path(tempfile.mkdtemp(prefix="cuda-memory-"))
    models: dict[str, Path] = {
        "llama-demo": write_model(workdir / "demo.gguf", DEMO_SHAPE),
        "llama-100m": write_model(workdir / "bench.gguf", BENCH_SHAPE),
    }
    wanted = {name for name in args.families.split(",") if name}
    for name, family in sorted(load_all().items()):
        if not wanted or name in wanted:
            try:
                models[name] = family.write(workdir / f"{name}.gguf")
            except Exception as error:  # a generator that fails here is reported, not fatal
                print(f"{name}: could not generate: {error}", file=sys.stderr)

    settings = [
        (num_ctx, slots, kv, fa)
        for num_ctx in (512, 4096)
        for slots in (1, 4)
        for kv, fa in (("f16", False), ("f16", True), ("q8_0", True))
    ]
    rows: list[dict[str, Any]] = []
    for name, path in models.items():
        try:
            info = model_info_from_gguf(path)
        except Exception as error:  # measured all the same; planned later with --compare
            print(f"{name}: not planned: {error}", file=sys.stderr)
            info = None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 999
        params.use_extra_bufts = False
        mark = capture.mark()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            print(f"{name}: llama.cpp could not load it", file=sys.stderr)
            continue
        load_reports = parse_buffer_reports(capture.since(mark))
        for num_ctx, slots, kv, fa in settings:
            config = MemoryConfig(
                num_ctx=num_ctx,
                num_parallel=slots,
                kv_cache_type=KVCacheType(kv),
                flash_attention=fa,
                gpu_layers=-1,
                tensor_split=(1.0,),
            )
            refusal = context_refusal(info, config) if info is not None else None
            # the runtime's layout: one unified pool, the memory model's sequence ids
            n_seq_max = estimate_memory(info, config).n_seq_max if info is not None and not refusal else slots
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = num_ctx * slots
            cparams.n_seq_max = n_seq_max
            cparams.n_batch = cparams.n_ubatch = 512
            cparams.kv_unified = True
            cparams.swa_full = config.swa_full
            cparams.flash_attn_type = 1 if fa else 0
            cparams.type_k = config.type_k.ggml_type
            cparams.type_v = config.type_v.ggml_type
            mark = capture.mark()
            before = _nvml_process_bytes()
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            row: dict[str, Any] = {
                "model": name,
                "num_ctx": num_ctx,
                "slots": slots,
                "kv": kv,
                "fa": fa,
                "swa_full": config.swa_full,
                "kv_unified": True,
                "n_seq_max": n_seq_max,
            }
            if not ctx:
                row.update(refused_by_llama=True, refused_by_plan=refusal is not None)
                rows.append(row)
                continue
            time.sleep(0.05)
            after = _nvml_process_bytes()
            reports = parse_buffer_reports(capture.since(mark))
            llama_cpp.llama_free(ctx)
            row["refused_by_plan"] = refusal is not None
            measured = {
                "weights": load_reports.by_device("weights").get("CUDA0", 0.0) * MiB,
                "kv_cache": reports.by_device("kv_cache").get("CUDA0", 0.0) * MiB,
                "recurrent": reports.by_device("recurrent").get("CUDA0", 0.0) * MiB,
                "compute": reports.by_device("compute").get("CUDA0", 0.0) * MiB,
                "host_compute": reports.by_device("compute").get("CUDA_Host", 0.0) * MiB,
                "nvml_process": after,
                "nvml_context_delta": (after - before) if after is not None and before is not None else None,
            }
            row.update(measured=measured, path=str(path))
            rows.append(row)
        llama_cpp.llama_model_free(model)

    Path(args.out).write_text(json.dumps(rows, indent=1))
    return compare(rows)


def _planned(row: dict[str, Any], models: dict[str, Any]) -> dict[str, int] | str:
    from parallama_runtime.planning.memory import KVCacheType, MemoryConfig, context_refusal, estimate_memory

    info = models.get(row["model"])
    if info is None:
        return "no model"
    config = MemoryConfig(
        num_ctx=row["num_ctx"],
        num_parallel=row["slots"],
        kv_cache_type=KVCacheType(row["kv"]),
        flash_attention=row["fa"],
        # the first GPU run (2026-11-26) left llama.cpp's own default, full-size SWA caches
        swa_full=row.get("swa_full", True),
        gpu_layers=-1,
        tensor_split=(1.0,),
        # that run also used one KV stream per slot; later runs record the runtime's unified layout
        kv_unified=row.get("kv_unified", False),
        n_seq_max=row.get("n_seq_max", row["slots"]),
    )
    refusal = context_refusal(info, config)
    if refusal:
        return "refused"
    gpu = estimate_memory(info, config).devices[0]
    return {
        "weights": gpu.weights_bytes,
        "kv_cache": gpu.kv_cache_bytes,
        "recurrent": gpu.recurrent_bytes,
        "compute": gpu.compute_bytes,
        "overhead": gpu.overhead_bytes,
    }


def compare(rows: list[dict[str, Any]]) -> int:
    """Print measured against what today's memory model plans for the same models and settings."""
    from parallama_runtime.demo_model import BENCH_SHAPE, DEMO_SHAPE, write_model
    from parallama_runtime.planning.model_info import model_info_from_gguf
    from support.families import load_all

    workdir = Path(tempfile.mkdtemp(prefix="cuda-compare-"))
    writers: dict[str, Any] = {
        "llama-demo": lambda p: write_model(p, DEMO_SHAPE),
        "llama-100m": lambda p: write_model(p, BENCH_SHAPE),
    }
    writers.update({name: family.write for name, family in load_all().items()})
    models: dict[str, Any] = {}
    for name in {row["model"] for row in rows}:
        try:
            models[name] = model_info_from_gguf(writers[name](workdir / f"{name}.gguf"))
        except Exception as error:
            print(f"{name}: not planned: {error}", file=sys.stderr)
    print(
        f"{'model':<22} {'ctx':>5} {'np':>2} {'kv':>5} {'fa':>2} | {'KV plan/meas MiB':>21} | "
        f"{'RS plan/meas':>15} | {'compute plan/meas':>19} | {'weights plan/meas':>19} | NVML process MiB"
    )
    for row in rows:
        head = f"{row['model']:<22} {row['num_ctx']:>5} {row['slots']:>2} {row['kv']:>5} {int(row['fa']):>2}"
        planned = _planned(row, models)
        if "measured" not in row or isinstance(planned, str):
            print(
                f"{head} | llama.cpp {'refused' if 'measured' not in row else 'created'}, plan: "
                f"{planned if isinstance(planned, str) else 'fits'}"
            )
            continue
        p, m = planned, row["measured"]
        buffers = m["weights"] + m["kv_cache"] + m["recurrent"] + m["compute"]
        nvml = "-"
        if m["nvml_process"] is not None:
            nvml = f"{m['nvml_process'] / MiB:.0f} (overhead {(m['nvml_process'] - buffers) / MiB:.0f})"
        print(
            f"{head} | {p['kv_cache'] / MiB:>9.2f} {m['kv_cache'] / MiB:>9.2f}  | "
            f"{p['recurrent'] / MiB:>6.2f} {m['recurrent'] / MiB:>6.2f}  | "
            f"{p['compute'] / MiB:>8.2f} {m['compute'] / MiB:>8.2f}  | "
            f"{p['weights'] / MiB:>8.2f} {m['weights'] / MiB:>8.2f}  | {nvml}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
