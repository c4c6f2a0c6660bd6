"""Named model shapes for planning without a file: ``parallama plan --model llama-3.1-8b``.

Each preset is the explicit-metadata form the CRD accepts (camelCase keys), taken from the models'
published GGUF headers. ``demo`` is not here: it is a real GGUF generated on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

_DEEPSEEK_R1_Q2: dict[str, Any] = {
    "name": "DeepSeek-R1-Q2_K",
    "architecture": "deepseek2",
    "blockCount": 61,
    "embeddingLength": 7168,
    "headCount": 128,
    "headCountKv": 128,
    "keyLength": 192,
    "valueLength": 128,
    "contextLength": 163840,
    "vocabSize": 129280,
    "feedForwardLength": 18432,
    "expertCount": 256,
    "expertUsedCount": 8,
    "kvLoraRank": 512,
    "ropeDimensionCount": 64,
    "sizeBytes": 202_000_000_000,
    "gguf": {
        "leading_dense_block_count": 3,
        "expert_shared_count": 1,
        "expert_feed_forward_length": 2048,
        "attention.q_lora_rank": 1536,
    },
}
"""DeepSeek R1's header as converted before llama.cpp's MLA change (see the presets below)."""

PRESETS: dict[str, dict[str, Any]] = {
    # Meta Llama 3.1 8B Instruct, Q4_K_M: 32 layers, 8 KV heads of 128 -> 131072 bytes/token in f16
    "llama-3.1-8b": {
        "name": "Llama-3.1-8B-Instruct-Q4_K_M",
        "architecture": "llama",
        "blockCount": 32,
        "embeddingLength": 4096,
        "headCount": 32,
        "headCountKv": 8,
        "keyLength": 128,
        "valueLength": 128,
        "contextLength": 131072,
        "vocabSize": 128256,
        "feedForwardLength": 14336,
        "sizeBytes": 4920734016,
    },
    # Qwen2.5 32B Instruct, Q4_K_M
    "qwen2.5-32b": {
        "name": "Qwen2.5-32B-Instruct-Q4_K_M",
        "architecture": "qwen2",
        "blockCount": 64,
        "embeddingLength": 5120,
        "headCount": 40,
        "headCountKv": 8,
        "keyLength": 128,
        "valueLength": 128,
        "contextLength": 32768,
        "vocabSize": 152064,
        "feedForwardLength": 27648,
        "sizeBytes": 19851336256,
    },
    # Llama 3.3 70B Instruct, Q4_K_M
    "llama-3.3-70b": {
        "name": "Llama-3.3-70B-Instruct-Q4_K_M",
        "architecture": "llama",
        "blockCount": 80,
        "embeddingLength": 8192,
        "headCount": 64,
        "headCountKv": 8,
        "keyLength": 128,
        "valueLength": 128,
        "contextLength": 131072,
        "vocabSize": 128256,
        "feedForwardLength": 28672,
        "sizeBytes": 42520398880,
    },
    # The seed article's model: DeepSeek R1 (671B, the deepseek2 architecture in llama.cpp) at a Q2
    # quantisation, about 202 GB. The R1 GGUFs published when the article was written were converted
    # before llama.cpp's MLA re-conversion (April 2025): their headers carry no
    # attention.key_length_mla, so llama.cpp caches full per-head K (128 x 192) and V (128 x 128):
    # 4,997,120 bytes per token in f16, about 76 GiB for 4 slots of 4096 tokens.
    "deepseek-r1-q2": _DEEPSEEK_R1_Q2,
    # The same model re-converted after llama.cpp's MLA change (convert_hf_to_gguf.py since April
    # 2025): one latent KV "head" of kv_lora_rank + rope dims (576) and no V cache: 70,272 bytes per
    # token in f16, 71 times less.
    "deepseek-r1-q2-mla": {
        **_DEEPSEEK_R1_Q2,
        "name": "DeepSeek-R1-Q2_K (MLA conversion)",
        "headCountKv": 1,
        "keyLength": 576,
        "valueLength": 512,
        "keyLengthMla": 192,
        "valueLengthMla": 128,
    },
    # An embedding model: Qwen3-Embedding-0.6B (qwen3 with last-token pooling, tied embeddings),
    # f16: 595,776,512 parameters. A slot embeds one input of up to num_ctx tokens; the runtime serves
    # /api/embed and /v1/embeddings only. Its embedding context makes a whole input one micro-batch
    # and outputs every token, so compute and output buffers grow with num_ctx (docs/memory-model.md).
    "qwen3-embedding-0.6b": {
        "name": "Qwen3-Embedding-0.6B-f16",
        "architecture": "qwen3",
        "blockCount": 28,
        "embeddingLength": 1024,
        "headCount": 16,
        "headCountKv": 8,
        "keyLength": 128,
        "valueLength": 128,
        "contextLength": 32768,
        "vocabSize": 151669,
        "feedForwardLength": 3072,
        "poolingType": "last",
        "sizeBytes": 1_191_553_024,
    },
}
