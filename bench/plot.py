"""One figure of the serving benchmarks, drawn from whatever bench/out/<scenario>.json exist.

Kept apart from the runners so that it needs nothing but matplotlib and can redraw old results:

    python bench/plot.py            # bench/out/serving.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
COLORS = {"bare": "0.4", "parallama": "tab:blue", "llama_server": "tab:green"}
LABELS = {"bare": "bare llama_decode", "parallama": "parallama", "llama_server": "llama-server"}


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    keys = [k for k in series if any(v is not None for v in series[k])]
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [g + (i - (len(keys) - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in series[key]]
        ax.bar(xs, ys, width, label=LABELS[key], color=COLORS[key])
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def render(out: Path = OUT) -> Path | None:
    """Write out/serving.png; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saturated, chat = _load(out, "saturated"), _load(out, "chat")
    uneven, long = _load(out, "uneven"), _load(out, "long_prompt")
    panels = [p for p in (saturated, chat, uneven, long) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    ax_iter = iter(axes[0])
    if saturated:
        ax = next(ax_iter)
        rows = saturated["rows"]
        slots = [r["slots"] for r in rows]
        for key, style in (("bare", "--o"), ("parallama", "-o"), ("llama_server", "-o")):
            if all(key in r for r in rows):
                ys = [r[key]["tokens_per_second"] for r in rows]
                ax.plot(slots, ys, style, color=COLORS[key], label=LABELS[key])
        ax.set_xscale("log", base=2)
        ax.set_xticks(slots, [str(s) for s in slots])
        ax.set_ylim(bottom=0)
        ax.set(xlabel="slots (2 clients each)", ylabel="tokens/s", title="(a) saturated throughput")
        ax.legend(fontsize=8)
    if chat:
        r = chat["results"]
        keys = ["bare", "parallama", "llama_server"]
        groups = ["wall", "TTFT turn 1 p50", "TTFT turn 2+ p50"]
        fields = ["wall", "ttft_turn1_p50", "ttft_later_p50"]
        series = {k: [r.get(k, {}).get(f) for f in fields] for k in keys}
        _bars(
            next(ax_iter),
            groups,
            series,
            "seconds (lower is better)",
            "(b) multi-turn chat (bare: floor estimate)",
        )
    if uneven:
        r = uneven["results"]
        series = {
            k: [r[k]["tokens_per_second"] if k in r else None] for k in ("bare", "parallama", "llama_server")
        }
        _bars(next(ax_iter), ["tokens/s"], series, "tokens/s (higher is better)", "(c) uneven answer lengths")
    if long:
        r = long["results"]
        fields = ["itl_window_p50", "itl_window_p99", "long_ttft"]
        series = {k: [r.get(k, {}).get(f) for f in fields] for k in ("bare", "parallama", "llama_server")}
        _bars(
            next(ax_iter),
            ["ITL p50", "ITL p99", "long TTFT"],
            series,
            "seconds (lower is better)",
            "(d) long prompt while streams decode",
        )
    fig.tight_layout()
    path = out / "serving.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_or_explain(out: Path = OUT) -> str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            f"plot skipped: matplotlib is not installed in {sys.executable}; "
            "`pip install -e '.[bench]'` (or just matplotlib), then `python bench/plot.py` "
            f"draws {out / 'serving.png'} from the JSON files"
        )
    path = render(out)
    return f"wrote {path}" if path else "plot skipped: no results in " + str(out)


if __name__ == "__main__":
    print(render_or_explain())
