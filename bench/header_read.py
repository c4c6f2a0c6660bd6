"""Time and memory of reading a Qwen2.5-sized GGUF header: the bounded reader against GGUFReader.

Writes (once, cached under the temp dir) a GGUF file with Qwen2.5-7B's header: 152,064 tokens of
realistic lengths, 151,387 merges, scores, token types and the 339 tensor infos of the 28-layer
model. The tensor data are a hole (the file is sparse): only the header is ever read. Then, each in
a fresh subprocess so that its peak RSS is its own:

* ``baseline``: the interpreter with ``gguf`` imported, nothing read (the floor of the others);
* ``bounded``: ``read_gguf_header(path)``;
* ``bounded-http``: ``read_gguf_header(RangeReader(url))`` against a local Range-capable server;
* ``gguf``: ``gguf.GGUFReader(path)``, the way ``model_info`` reads headers today.

Prints wall and CPU seconds of the read and the child's peak RSS (``ru_maxrss``), and the ratios.

    .venv/bin/python bench/header_read.py [--repeat 3] [--rewrite]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

VOCAB = 152_064
MERGES = 151_387
HEADER_VERSION = "v1"  # bump when the generated file changes


def _tokens(count: int, rng: random.Random) -> list[str]:
    """Byte-level BPE-like tokens: mostly 2-8 characters, a 'Ġ' (space) prefix on many, some long."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,;:()[]{}"
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20]
    weights = [4, 9, 13, 14, 13, 11, 9, 7, 5, 4, 4, 3, 2, 2]
    tokens = []
    for index, length in enumerate(rng.choices(lengths, weights, k=count)):
        body = "".join(rng.choices(letters, k=length))
        tokens.append(("Ġ" if index % 3 == 0 else "") + body)
    return tokens


def write_qwen_header(path: Path) -> Path:
    """A Qwen2.5-7B-shaped GGUF whose tensor data are a sparse hole."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType

    rng = random.Random(0)
    tokens = _tokens(VOCAB, rng)
    merges = [f"{tokens[rng.randrange(VOCAB)]} {tokens[rng.randrange(VOCAB)]}" for _ in range(MERGES)]
    n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim = 28, 3584, 18944, 28, 4, 128

    writer = GGUFWriter(path, "qwen2")
    writer.add_name("Qwen2.5 7B Instruct (header only)")
    writer.add_block_count(n_layer)
    writer.add_context_length(32768)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(15)  # Q4_K_M
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(TokenType.NORMAL)] * (VOCAB - 22) + [int(TokenType.CONTROL)] * 22)
    writer.add_token_scores([-float(i) for i in range(VOCAB)])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)
    writer.add_bos_token_id(151643)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% endfor %}")

    q4k, q6k, f32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F32
    infos: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (VOCAB, n_embd), q4k)
    ]
    kv = n_head_kv * head_dim
    for i in range(n_layer):
        infos += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), f32),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), q4k),
            (f"blk.{i}.attn_q.bias", (n_embd,), f32),
            (f"blk.{i}.attn_k.weight", (kv, n_embd), q4k),
            (f"blk.{i}.attn_k.bias", (kv,), f32),
            (f"blk.{i}.attn_v.weight", (kv, n_embd), q6k),
            (f"blk.{i}.attn_v.bias", (kv,), f32),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), q4k),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), f32),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), q4k),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), q4k),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), q6k),
        ]
    infos += [("output_norm.weight", (n_embd,), f32), ("output.weight", (VOCAB, n_embd), q6k)]
    data_bytes = 0
    for name, shape, qtype in infos:  # numpy order: the last dimension is ggml's ne[0]
        block, size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes, raw_dtype=qtype)
        data_bytes += -(-n_bytes // writer.data_alignment) * writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_bytes = path.stat().st_size
    data_offset = -(-header_bytes // writer.data_alignment) * writer.data_alignment
    with path.open("r+b") as handle:
        handle.truncate(data_offset + data_bytes)  # a hole, not zeros on disk
    return path


def cached_header(rewrite: bool = False) -> Path:
    """The cached header file, written by a subprocess so that this process stays small (below)."""
    path = Path(tempfile.gettempdir()) / f"parallama-bench-qwen2.5-header-{HEADER_VERSION}.gguf"
    if rewrite or not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        subprocess.run([sys.executable, __file__, "--write", str(partial)], check=True)
        partial.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# children


# Linux carries a process's peak RSS across fork and exec into the child's ru_maxrss, so the parent
# stays small (no gguf, no numpy, the file written by another child) and the children also report
# VmHWM, the peak of their own address space only.
_CHILD = r"""
import json, resource, sys, time
mode, target = sys.argv[1], sys.argv[2]
import gguf
from parallama_runtime.planning.gguf_header import RangeReader, read_gguf_header
wall, cpu = time.perf_counter(), time.process_time()
if mode == "bounded":
    header = read_gguf_header(target)
    summary = (len(header.tensors), header.array_lengths["tokenizer.ggml.tokens"],
               header.array_lengths["tokenizer.ggml.merges"], header.data_offset)
elif mode == "bounded-http":
    with RangeReader(target) as source:
        header = read_gguf_header(source)
        requested = source.requested
    summary = (len(header.tensors), header.array_lengths["tokenizer.ggml.tokens"],
               header.array_lengths["tokenizer.ggml.merges"], header.data_offset, requested)
elif mode == "gguf":
    reader = gguf.GGUFReader(target)
    summary = (len(reader.tensors), len(reader.fields["tokenizer.ggml.tokens"].data),
               len(reader.fields["tokenizer.ggml.merges"].data), reader.data_offset)
else:
    summary = None
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({
    "wall_s": wall, "cpu_s": cpu, "summary": summary, "vm_hwm_mb": hwm / 1024,
    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def run_child(mode: str, target: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, target], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if not match or int(match.group(1)) >= size:
            self.send_error(416)
            return
        start, end = int(match.group(1)), min(int(match.group(2)), size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with path.open("rb") as handle:
            handle.seek(start)
            left = end - start + 1
            while left:
                chunk = handle.read(min(left, 1 << 20))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the reader had the whole header before the range's end: expected
                left -= len(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per reader; the median is shown")
    parser.add_argument("--rewrite", action="store_true", help="regenerate the cached header file")
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)  # the writing child
    args = parser.parse_args()
    if args.write:
        write_qwen_header(Path(args.write))
        return

    path = cached_header(args.rewrite)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        lambda *a, **k: _RangeHandler(*a, directory=str(path.parent), **k),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"

    modes = {"baseline": str(path), "bounded": str(path), "bounded-http": url, "gguf": str(path)}
    results: dict[str, dict[str, float]] = {}
    summaries: dict[str, Any] = {}
    for mode, target in modes.items():
        runs = [run_child(mode, target) for _ in range(args.repeat)]
        assert len({json.dumps(run["summary"]) for run in runs}) == 1, runs
        summaries[mode] = runs[0]["summary"]
        results[mode] = {
            key: sorted(run[key] for run in runs)[len(runs) // 2]
            for key in ("wall_s", "cpu_s", "max_rss_mb", "vm_hwm_mb")
        }
    server.shutdown()
    server.server_close()

    tensors, vocab, merges, data_offset, requested = summaries["bounded-http"]
    assert summaries["bounded"] == summaries["gguf"] == [tensors, vocab, merges, data_offset], summaries
    print(
        f"{path}: header {data_offset / 1e6:.2f} MB ({vocab} tokens, {merges} merges, {tensors} tensors), "
        f"file {path.stat().st_size / 1e9:.2f} GB (sparse); over HTTP {requested / 2**20:.0f} MiB requested"
    )

    base = results["baseline"]["max_rss_mb"]
    print(
        f"\n{'reader':<14}{'wall s':>9}{'cpu s':>9}{'ru_maxrss MB':>14}{'over baseline':>15}{'VmHWM MB':>10}"
    )
    for mode, result in results.items():
        print(
            f"{mode:<14}{result['wall_s']:>9.3f}{result['cpu_s']:>9.3f}{result['max_rss_mb']:>14.1f}"
            f"{result['max_rss_mb'] - base:>15.1f}{result['vm_hwm_mb']:>10.1f}"
        )
    new, old = results["bounded"], results["gguf"]
    print(
        f"\ngguf / bounded: wall x{old['wall_s'] / new['wall_s']:.0f}, "
        f"cpu x{old['cpu_s'] / new['cpu_s']:.0f}, "
        f"peak RSS x{old['max_rss_mb'] / new['max_rss_mb']:.1f} "
        f"(over baseline x{(old['max_rss_mb'] - base) / max(new['max_rss_mb'] - base, 0.1):.0f})"
    )
    print(f"(median of {args.repeat} runs each; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
