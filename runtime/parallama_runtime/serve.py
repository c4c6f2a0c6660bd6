"""``parallama serve``: settings from flags and the pod's environment, planning, and the server's life.

Settings follow one rule: a flag beats its environment variable, which beats the default. With the
slot count on auto the local machine is planned like a cluster node (``planner.make_plan`` over
``local_inventory.local_nodes()``), so ``parallama serve`` on a laptop picks the same number of slots
the operator would pick for that hardware.

Lifecycle: the HTTP listener starts first (``/healthz`` answers, ``/readyz`` says 503 while the model
loads), then the model loads off the event loop. SIGTERM (Kubernetes' stop signal) flips readiness
to 503 and stops admitting, lets in-flight requests finish within the grace period, cancels the rest,
and frees llama.cpp's objects before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web

from .api import ModelCard, RuntimeAPI
from .api.model_details import model_info, parameter_size, quantization_level
from .demo_model import DEMO_SHAPE
from .engine import Engine, EngineConfig, EngineLoadError
from .engine.cpu import cpu_limits
from .engine.values import DEFAULT_PREFILL_BUDGET
from .metrics import RuntimeMetrics
from .planning.memory import KVCacheType, estimate_memory
from .planning.model_info import ModelInfo, ModelSourceError, UnsupportedModelError, model_info_from_gguf
from .telemetry import NvmlSampler
from .termination import Failure, FailureReason, write_termination_message

__all__ = ["BackgroundServer", "ServeSettings", "SettingsError", "add_arguments", "resolve_settings", "run"]

log = logging.getLogger("parallama.serve")

DEFAULT_PORT = 11434
DEFAULT_NUM_CTX = 4096
DEFAULT_MAX_QUEUE = 64
DEFAULT_GRACE_SECONDS = 30.0


class SettingsError(ValueError):
    """A flag or environment variable has a value the server cannot use."""


@dataclass
class ServeSettings:
    model: str | None = None
    parallel: int | None = None
    """None: auto (plan the local machine)."""
    num_ctx: int = DEFAULT_NUM_CTX
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attention: bool = True
    gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    swa_full: bool = False
    """Full-size caches for sliding-window layers; False is llama-server's default (a window-sized
    cache), which lets several times more slots fit for models such as Gemma."""
    prefill_budget: int = DEFAULT_PREFILL_BUDGET
    """Prompt tokens per step while other requests generate (bounds their inter-token latency)."""
    prompt_cache: bool = True
    """Keep finished requests' KV cells for later prompts sharing their prefix."""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_name: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    threads: int | None = None
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    notes: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", help="GGUF file (env PARALLAMA_MODEL; default: a generated demo model)"
    )
    parser.add_argument("--parallel", help="slots, or 'auto' (env OLLAMA_NUM_PARALLEL; default auto)")
    parser.add_argument(
        "--num-ctx", type=int, help=f"tokens per slot (env OLLAMA_CONTEXT_LENGTH; {DEFAULT_NUM_CTX})"
    )
    parser.add_argument(
        "--kv-cache-type", choices=[t.value for t in KVCacheType], help="env OLLAMA_KV_CACHE_TYPE (f16)"
    )
    parser.add_argument(
        "--flash-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="env OLLAMA_FLASH_ATTENTION (on)",
    )
    parser.add_argument(
        "--gpu-layers", type=int, help="layers to offload, -1 = all (env PARALLAMA_GPU_LAYERS)"
    )
    parser.add_argument("--tensor-split", help="comma list of fractions per GPU (env PARALLAMA_TENSOR_SPLIT)")
    parser.add_argument(
        "--swa-full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="full-size caches for sliding-window layers (env PARALLAMA_SWA_FULL; off, like llama-server)",
    )
    parser.add_argument(
        "--prefill-budget",
        type=int,
        help="prompt tokens per step while other requests generate: bounds their inter-token latency "
        f"when a long prompt arrives (env PARALLAMA_PREFILL_BUDGET; default {DEFAULT_PREFILL_BUDGET})",
    )
    parser.add_argument(
        "--prompt-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep finished requests' KV cells for prompts that share their prefix "
        "(env PARALLAMA_PROMPT_CACHE; on)",
    )
    parser.add_argument("--host", help="listen address (env OLLAMA_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--served-name", help="model name clients use (default: the file's stem)")
    parser.add_argument(
        "--max-queue", type=int, help=f"waiting requests before 503 (default {DEFAULT_MAX_QUEUE})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for llama.cpp (default: the CPUs this container may use (cgroup quota))",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        help=f"seconds in-flight requests get on SIGTERM ({DEFAULT_GRACE_SECONDS:g})",
    )


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _bool(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (1 or 0)")


def _split(raw: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} must be a comma list of numbers") from None
    if any(v < 0 for v in values) or (values and sum(values) <= 0):
        raise SettingsError(f"{name}={raw!r} must hold non-negative fractions with a positive sum")
    return values


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    """Flags, then environment, then defaults; raises :class:`SettingsError` on bad values."""
    env = os.environ if env is None else env
    s = ServeSettings()
    s.model = getattr(args, "model", None) or env.get("PARALLAMA_MODEL") or None

    parallel = getattr(args, "parallel", None)
    raw_parallel = str(parallel) if parallel is not None else env.get("OLLAMA_NUM_PARALLEL", "").strip()
    if raw_parallel and raw_parallel.lower() not in ("auto", "0"):
        try:
            s.parallel = int(raw_parallel)
        except ValueError:
            raise SettingsError(
                f"parallel slots must be an integer or 'auto', got {raw_parallel!r}"
            ) from None
        if s.parallel < 1:
            raise SettingsError(f"parallel slots must be at least 1, got {s.parallel}")

    num_ctx = getattr(args, "num_ctx", None)
    s.num_ctx = (
        num_ctx if num_ctx is not None else (_env_int(env, "OLLAMA_CONTEXT_LENGTH") or DEFAULT_NUM_CTX)
    )
    if s.num_ctx < 16:
        raise SettingsError(f"num_ctx must be at least 16, got {s.num_ctx}")

    kv = getattr(args, "kv_cache_type", None) or env.get("OLLAMA_KV_CACHE_TYPE", "").strip() or "f16"
    try:
        s.kv_cache_type = KVCacheType(kv.lower())
    except ValueError:
        allowed = ", ".join(t.value for t in KVCacheType)
        raise SettingsError(f"KV cache type {kv!r} is not one of {allowed}") from None

    flash = getattr(args, "flash_attention", None)
    if flash is not None:
        s.flash_attention = bool(flash)
    elif env.get("OLLAMA_FLASH_ATTENTION", "").strip():
        s.flash_attention = _bool(env["OLLAMA_FLASH_ATTENTION"], "OLLAMA_FLASH_ATTENTION")
    if s.kv_cache_type.is_quantized and not s.flash_attention:
        s.notes.append(f"V cache stays f16: a {s.kv_cache_type} V cache needs flash attention")

    gpu_layers = getattr(args, "gpu_layers", None)
    s.gpu_layers = gpu_layers if gpu_layers is not None else _env_int(env, "PARALLAMA_GPU_LAYERS") or -1
    if gpu_layers is None and env.get("PARALLAMA_GPU_LAYERS", "").strip() == "0":
        s.gpu_layers = 0

    split = getattr(args, "tensor_split", None)
    if split:
        s.tensor_split = _split(split, "--tensor-split")
    elif env.get("PARALLAMA_TENSOR_SPLIT", "").strip():
        s.tensor_split = _split(env["PARALLAMA_TENSOR_SPLIT"], "PARALLAMA_TENSOR_SPLIT")

    swa_full = getattr(args, "swa_full", None)
    if swa_full is not None:
        s.swa_full = bool(swa_full)
    elif env.get("PARALLAMA_SWA_FULL", "").strip():
        s.swa_full = _bool(env["PARALLAMA_SWA_FULL"], "PARALLAMA_SWA_FULL")

    budget = getattr(args, "prefill_budget", None)
    if budget is None:
        budget = _env_int(env, "PARALLAMA_PREFILL_BUDGET")
    if budget is not None:
        if budget < 1:
            raise SettingsError(f"--prefill-budget must be at least 1 token, got {budget}")
        s.prefill_budget = budget
    cache = getattr(args, "prompt_cache", None)
    if cache is not None:
        s.prompt_cache = bool(cache)
    elif env.get("PARALLAMA_PROMPT_CACHE", "").strip():
        s.prompt_cache = _bool(env["PARALLAMA_PROMPT_CACHE"], "PARALLAMA_PROMPT_CACHE")

    host = getattr(args, "host", None)
    port = getattr(args, "port", None)
    if host is None and env.get("OLLAMA_HOST", "").strip():
        # Ollama's form: host, host:port, or scheme://host:port
        text = env["OLLAMA_HOST"].strip().split("://", 1)[-1].rstrip("/")
        hostpart, sep, portpart = text.rpartition(":")
        if sep and portpart.isdigit() and "]" not in portpart:
            host = hostpart or "127.0.0.1"
            if port is None:
                port = int(portpart)
        else:
            host = text
    s.host = host or "127.0.0.1"
    s.port = port if port is not None else DEFAULT_PORT
    s.served_name = getattr(args, "served_name", None)
    max_queue = getattr(args, "max_queue", None)
    s.max_queue = max_queue if max_queue is not None else DEFAULT_MAX_QUEUE
    if s.max_queue < 0:
        raise SettingsError("--max-queue must be 0 or more")
    s.threads = getattr(args, "threads", None)
    if s.threads is not None and s.threads < 0:
        raise SettingsError(f"--threads must be 0 (auto) or more, got {s.threads}")
    s.threads = s.threads or None
    grace = getattr(args, "shutdown_grace", None)
    s.grace_seconds = grace if grace is not None else DEFAULT_GRACE_SECONDS
    return s


class Server:
    """One runtime: engine, API, metrics, telemetry; :meth:`serve` runs it until ``stop`` is set."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = RuntimeMetrics()
        self.sampler = NvmlSampler()
        self.port = settings.port
        self.api: RuntimeAPI | None = None
        self.engine: Engine | None = None
        self.plan_reason = ""
        self.stop_event: asyncio.Event | None = None
        self.failure: Failure | None = None
        """Why the server stopped on its own (also written to the termination log)."""

    def _fail(self, failure: Failure) -> None:
        """Say why where Kubernetes keeps a container's last words (the operator reads them)."""
        if self.failure is None:
            self.failure = failure
            write_termination_message(failure.format())

    def _model_path(self) -> Path:
        if self.settings.model:
            return Path(self.settings.model)
        from .demo_model import cached_demo_model

        path = cached_demo_model()
        log.info("no model given: serving the generated demo model %s", path)
        return path

    def _slots(self, info: ModelInfo) -> int:
        s = self.settings
        if s.parallel is not None:
            self.plan_reason = f"{s.parallel} slots as configured"
            return s.parallel
        from .local_inventory import local_nodes
        from .planning.planner import PlanRequest, make_plan

        plan = make_plan(
            info,
            local_nodes(),
            PlanRequest(
                num_ctx=s.num_ctx,
                kv_cache_type=s.kv_cache_type,
                flash_attention=s.flash_attention,
                swa_full=s.swa_full,
            ),
        )
        self.plan_reason = plan.reason
        if not plan.fits:
            log.warning("auto parallelism: %s; starting with 1 slot anyway", plan.reason)
            return 1
        log.info("auto parallelism: %s", plan.reason)
        return plan.num_parallel

    def threads(self) -> int:
        """``--threads``, else the CPUs the container may use: the host's core count would have
        llama.cpp's threads wait on the CFS quota (see ``engine.cpu``)."""
        if self.settings.threads is not None:
            return self.settings.threads
        return cpu_limits().usable

    def engine_config(self, path: Path, slots: int) -> EngineConfig:
        """The llama.cpp context the settings ask for; its ``memory_config`` is what was planned."""
        s = self.settings
        return EngineConfig(
            model_path=str(path),
            num_parallel=slots,
            num_ctx=s.num_ctx,
            kv_cache_type=s.kv_cache_type,
            flash_attention=s.flash_attention,
            gpu_layers=s.gpu_layers,
            tensor_split=s.tensor_split,
            threads=self.threads(),
            max_queue=s.max_queue,
            swa_full=s.swa_full,
            prefill_budget=s.prefill_budget,
            prompt_cache=s.prompt_cache,
        )

    async def serve(self, ready: threading.Event | None = None, install_signals: bool = True) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for note in s.notes:
            log.info("%s", note)
        path = self._model_path()
        try:
            info = model_info_from_gguf(path)
        except UnsupportedModelError as error:
            log.error("%s", error)
            self._fail(Failure(FailureReason.UNSUPPORTED_MODEL, str(error)))
            return 2
        except ModelSourceError as error:
            log.error("%s", error)
            self._fail(Failure(FailureReason.UNREADABLE_FILE, str(error)))
            return 2
        slots = self._slots(info)
        if s.threads is None:
            log.info("llama.cpp threads: %s", cpu_limits().describe())
        # the demo model's file name carries a content hash; clients should not have to know it
        name = s.served_name or (path.stem if s.model else DEMO_SHAPE.name)
        config = self.engine_config(path, slots)
        engine = Engine(config, observer=self.metrics)
        self.engine = engine
        stat = path.stat()
        card = ModelCard(
            name=name,
            path=str(path),
            size_bytes=stat.st_size,
            modified_at=stat.st_mtime,
            family=info.architecture,
            quantization_level=quantization_level(info.file_type),
            context_length=info.context_length,
            embedding_length=info.embedding_length,
            extra={"model_info": model_info(info.metadata)},
            num_ctx=s.num_ctx,
            num_parallel=slots,
        )
        api = RuntimeAPI(engine, self.metrics, card)
        self.api = api
        self.metrics.set_model(name, slots, s.num_ctx, s.kv_cache_type.value)
        self.metrics.bind(lambda: engine.stats() if engine.loaded else None, self.sampler.samples)
        gpus = self.sampler.start()
        gpu_count = len(self.sampler.samples()) if gpus else 0
        planned = replace(
            config.memory_config,
            gpu_layers=s.gpu_layers if gpu_count else 0,
            tensor_split=s.tensor_split or (1.0,) * max(gpu_count, 1),  # llama.cpp spreads over all GPUs
        )
        self.metrics.set_planned(estimate_memory(info, planned))

        runner = web.AppRunner(api.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.port)
        try:
            await site.start()
        except OSError as error:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, error)
            await runner.cleanup()
            self.sampler.stop()
            return 1
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("listening on http://%s:%d (model %s, %d slots)", s.host, self.port, name, slots)

        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signum, self.request_stop)
        try:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(None, engine.load)
            except Exception as error:
                api.load_error = str(error)
                log.error("model failed to load: %s", error)
                failure = (
                    error.failure
                    if isinstance(error, EngineLoadError)
                    else Failure(FailureReason.LOAD_FAILED, str(error), slots, s.num_ctx)
                )
                self._fail(failure)
                if ready is not None:
                    ready.set()
                return 1
            exit_code = 0

            def fatal(failure: Failure) -> None:  # scheduler or logging thread
                nonlocal exit_code
                exit_code = 1
                self._fail(failure)  # first: ggml may abort the process right after
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.request_stop)

            engine.on_fatal = fatal
            engine.start()
            card.parameter_size = parameter_size(engine.n_params)
            card.extra["model_info"] = model_info(info.metadata, engine.n_params)
            self.metrics.set_measured(engine.reports)
            api.ready = True
            log.info("model loaded in %.2fs; ready", time.perf_counter() - started)
            if ready is not None:
                ready.set()
            await self.stop_event.wait()
            await self._drain(api, engine)
            if exit_code:
                log.error("exiting: %s", self.failure.format() if self.failure else "failure")
            return exit_code
        finally:
            await runner.cleanup()
            await loop.run_in_executor(None, engine.close)
            self.sampler.stop()
            if install_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(signum)
            log.info("stopped")

    def request_stop(self) -> None:
        if self.stop_event is not None and not self.stop_event.is_set():
            log.info("stopping: no new requests; in-flight ones get %gs", self.settings.grace_seconds)
            self.stop_event.set()

    async def _drain(self, api: RuntimeAPI, engine: Engine) -> None:
        api.draining = True
        engine.stop_admitting()
        deadline = time.monotonic() + self.settings.grace_seconds
        while engine.in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - state lives in a thread
            await asyncio.sleep(0.05)
        if engine.in_flight():
            log.warning("grace period over: cancelling %d requests", engine.in_flight())
            engine.cancel_all()
            await asyncio.sleep(0.2)  # let handlers write their last line


class BackgroundServer:
    """A server on its own thread and event loop (tests, benchmarks); :meth:`start` waits until ready."""

    def __init__(self, settings: ServeSettings) -> None:
        self.server = Server(settings)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code: int | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{self.server.settings.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self.exit_code = loop.run_until_complete(
                    self.server.serve(self._ready, install_signals=False)
                )
            except BaseException:
                log.exception("server thread failed")
                self.exit_code = -1
            finally:
                self._ready.set()
                loop.close()

        self._thread = threading.Thread(target=main, name="parallama-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self.exit_code is not None:
            raise RuntimeError(f"server did not become ready (exit code {self.exit_code})")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.server.request_stop)
        if self._thread is not None:
            self._thread.join(timeout)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``parallama serve``; returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = resolve_settings(args)
    except SettingsError as error:
        log.error("%s", error)
        return 2
    if settings.model and not Path(settings.model).is_file():
        log.error("model file %s does not exist", settings.model)
        write_termination_message(
            Failure(FailureReason.UNREADABLE_FILE, f"model file {settings.model} does not exist").format()
        )
        return 2
    try:
        return asyncio.run(Server(settings).serve())
    except KeyboardInterrupt:
        return 130
