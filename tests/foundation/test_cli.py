"""``parallama plan``: JSON contract, exit codes, and the table a person reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from parallama_runtime.cli import main, parse_gpus

REQUIRED_KEYS = {
    "fits",
    "num_parallel",
    "num_ctx",
    "gpus_per_replica",
    "kv_cache_type",
    "kv_bytes_per_token",
    "reason",
}
MEMORY_KEYS = {
    "weights_bytes",
    "kv_cache_bytes",
    "compute_bytes",
    "overhead_bytes",
    "total_bytes",
    "usable_bytes",
    "headroom_fraction",
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_for_a_plan_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama-3.1-8b", "--gpus", "1xL4", "--output", "json")
    plan = json.loads(out)
    assert code == 0
    assert plan.keys() >= REQUIRED_KEYS and plan["memory"].keys() >= MEMORY_KEYS
    assert plan["fits"] is True and plan["num_parallel"] == 4 and plan["kv_bytes_per_token"] == 131072
    assert plan["memory"]["headroom_fraction"] == 0.2


def test_exit_3_when_an_explicit_count_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--gpus", "1xL4", "--num-ctx", "65536", "--parallel", "4", "--output", "json")
    plan = json.loads(out)
    assert code == 3
    assert plan["fits"] is False and plan["num_parallel"] == 4 and plan["shortfall_bytes"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "3xQuantumGPU"], "unknown GPU product 'QuantumGPU'"),
        (["--gpus", "2x24XB"], "unknown GPU product"),
        (["--model", "/nonexistent/model.gguf"], "cannot read model file"),
        (["--headroom", "1.5"], "headroom"),
        (["--min-parallel", "6", "--max-parallel", "2"], "min_parallel 6 exceeds max_parallel 2"),
    ],
)
def test_exit_2_on_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, out, err = run(capsys, "--gpus", "1xL4", *args)
    assert code == 2
    assert message in err and out == ""


def test_table_reads_like_a_capacity_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "deepseek-r1-q2", "--gpus", "8xL20")
    assert code == 0
    assert "FITS" in out and "kv cache" in out and "headroom 20%" in out
    bars = [line for line in out.splitlines() if line.startswith("gpu")]
    assert 5 <= len(bars) <= 8 and all("[" in bar and "|" in bar for bar in bars)


GEMMA3_12B = {  # 5 of every 6 layers attend to a window of 1024 tokens only
    "architecture": "gemma3",
    "sizeBytes": 8_000_000_000,
    "blockCount": 48,
    "embeddingLength": 3840,
    "headCount": 16,
    "headCountKv": 8,
    "keyLength": 256,
    "valueLength": 256,
    "contextLength": 131072,
    "vocabSize": 262144,
    "feedForwardLength": 15360,
    "slidingWindow": 1024,
}


def test_swa_full_is_planned_and_the_table_shows_the_window_cache(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tmp_path / "gemma3.json"
    model.write_text(json.dumps(GEMMA3_12B))
    common = ["--model", str(model), "--gpus", "1xL40S", "--num-ctx", "32768"]
    _, out, _ = run(capsys, *common, "--output", "json")
    small = json.loads(out)
    _, out, _ = run(capsys, *common, "--swa-full", "--output", "json")
    full = json.loads(out)
    assert small["swa_full"] is False and full["swa_full"] is True
    assert small["swa_cells_per_slot"] < small["kv_cells_per_slot"]
    assert full["swa_cells_per_slot"] == full["kv_cells_per_slot"]
    assert small["memory"]["kv_per_slot_bytes"] < full["memory"]["kv_per_slot_bytes"]
    assert small["num_parallel"] > full["num_parallel"]

    _, table, _ = run(capsys, *common)
    line = next(line for line in table.splitlines() if line.startswith("swa cache"))
    assert f"{small['swa_cells_per_slot']} of {small['kv_cells_per_slot']} cells" in line
    _, table, _ = run(capsys, *common, "--swa-full")
    assert "swa cache" not in table
    _, table, _ = run(capsys, "--model", "llama-3.1-8b", "--gpus", "1xL4")
    assert "swa cache" not in table  # no sliding-window layers, no line


def test_gpu_specs() -> None:
    two = parse_gpus("2x24GiB")
    assert (two[0].gpu_count, two[0].gpu_memory_bytes) == (2, 24 * 1024**3)
    mixed = parse_gpus("L4, 8xL20")
    assert [(n.gpu_count, n.product) for n in mixed] == [(1, "L4"), (8, "L20")]
    assert parse_gpus("cpu:64GiB")[0].cpu_memory_bytes == 64 * 1024**3
    local = parse_gpus("local")
    assert len(local) == 1 and (local[0].gpu_count > 0 or local[0].cpu_memory_bytes)


def test_console_script_plans_a_generated_gguf(tmp_path: Path, tiny_model: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "parallama_runtime.cli",
            "plan",
            "--model",
            str(tiny_model),
            "--gpus",
            "cpu:8GiB",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["gpus_per_replica"] == 0 and plan["num_parallel"] == 4
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers x (K+V) x kv heads x dims x f16
