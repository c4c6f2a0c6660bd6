"""Static checks of the container images (no Docker engine here): parsed Dockerfiles and .dockerignore."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
RUNTIME = REPO / "runtime" / "Dockerfile"
RUNTIME_CPU = REPO / "runtime" / "Dockerfile.cpu"
ALL = [OPERATOR, RUNTIME, RUNTIME_CPU]


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    result: list[Instruction] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        joined = buffer + line
        buffer = ""
        keyword, _, args = joined.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    assert not buffer, "dangling line continuation"
    return result


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def parse(path: Path) -> list[Stage]:
    """Stages with FROM images resolved through the global ARG defaults."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in instructions(path.read_text()):
        if inst.keyword == "ARG" and not stages:
            arg, _, default = inst.args.partition("=")
            global_args[arg] = default.strip('"')
        elif inst.keyword == "FROM":
            parts = inst.args.split()
            image = substitute(parts[0], global_args)
            stage_name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, stage_name))
        else:
            assert stages, f"{path}: {inst.keyword} before FROM"
            stages[-1].instructions.append(inst)
    return stages


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return [str(a) for a in parsed]


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_images_are_pinned_and_final_stage_runs_as_non_root(path: Path) -> None:
    stages = parse(path)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        assert "$" not in stage.image, f"unresolved ARG in FROM {stage.image}"
        repository, _, tag = stage.image.rpartition(":")
        assert repository and tag and "/" not in tag, f"{stage.image}: no tag"
        assert tag != "latest" and "latest" not in stage.image, stage.image
    for stage in stages:
        for copy in stage.all("COPY"):
            match = re.match(r"--from=(\S+)", copy)
            if match:
                assert match.group(1) in names, f"COPY --from={match.group(1)}: no such stage"
    final = stages[-1]
    users = final.all("USER")
    assert users, f"{path}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert final.all("ENTRYPOINT"), f"{path}: no ENTRYPOINT"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_copied_sources_exist_and_are_not_dockerignored(path: Path) -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in parse(path):
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _destination = copy.split()
            for source in sources:
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: not in the repository"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), (
                    f"{source} is dockerignored"
                )


def test_dockerignore_keeps_heavy_and_secret_things_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for pattern in (".git", ".venv", "*.gguf", "tests"):
        assert pattern in ignored


def test_operator_image_has_no_runtime_extra() -> None:
    stages = parse(OPERATOR)
    assert stages[-1].image.startswith("python:3.11-slim")
    installs = [run for stage in stages for run in stage.all("RUN") if "pip install" in run]
    assert installs
    joined = " ".join(installs)
    assert "runtime]" not in joined and "[runtime" not in joined and "llama-cpp-python" not in joined
    entry = exec_form(stages[-1].all("ENTRYPOINT")[-1]) + exec_form(stages[-1].all("CMD")[-1])
    assert entry[:2] == ["parallama", "operator"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in entry


def test_runtime_image_is_multi_stage_cuda() -> None:
    stages = parse(RUNTIME)
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", build.image), build.image
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", final.image), final.image
    envs = " ".join(build.all("ENV"))
    assert "CMAKE_ARGS=" in envs and "-DGGML_CUDA=on" in envs
    assert any("llama-cpp-python" in run for run in build.all("RUN"))
    assert any(copy.startswith(f"--from={build.name}") for copy in final.all("COPY"))
    check_runtime_final_stage(final)


def test_runtime_cpu_image() -> None:
    stages = parse(RUNTIME_CPU)
    assert len(stages) >= 2
    assert "GGML_CUDA" not in RUNTIME_CPU.read_text()
    check_runtime_final_stage(stages[-1])


def check_runtime_final_stage(final: Stage) -> None:
    assert "11434" in " ".join(final.all("EXPOSE")).split()
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["parallama", "serve"]
    assert any("/models" in volume for volume in final.all("VOLUME"))
    assert any("mkdir -p /models" in run and "chown 10001" in run for run in final.all("RUN"))


def image_env(stage: Stage) -> dict[str, str]:
    """ENV of a stage (KEY=VALUE form, values unquoted)."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use KEY=VALUE"
            env[key] = value
    return env


@pytest.mark.parametrize("path", [RUNTIME, RUNTIME_CPU], ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_image_listens_on_the_exposed_port_for_everyone(path: Path) -> None:
    """`parallama serve` as the image starts it (no flags, the image's ENV) binds 0.0.0.0 on EXPOSE's port."""
    try:
        from parallama_runtime import serve
    except ImportError as error:
        pytest.fail(f"parallama_runtime.serve is missing ({error})")
    final = parse(path)[-1]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    settings = serve.resolve_settings(parser.parse_args([]), env=image_env(final))
    assert settings.host == "0.0.0.0"
    assert str(settings.port) in " ".join(final.all("EXPOSE")).split()
    assert settings.model is None, "the image must not point at a model that is not mounted"


def test_operator_image_command_is_accepted_by_the_operator() -> None:
    try:
        from parallama_operator import main
    except ImportError as error:
        pytest.fail(f"parallama_operator.main is missing ({error})")
    final = parse(OPERATOR)[-1]
    command = exec_form(final.all("ENTRYPOINT")[-1]) + exec_form(final.all("CMD")[-1])
    assert command[:2] == ["parallama", "operator"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    main.add_arguments(parser)
    args, unknown = parser.parse_known_args(command[2:])
    assert unknown == []
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert {str(args.metrics_port), "8080"} <= set(" ".join(final.all("EXPOSE")).split())
