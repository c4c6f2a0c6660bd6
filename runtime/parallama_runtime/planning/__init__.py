"""The project's brain: what a model needs, what llama.cpp allocates for it, and where it fits.

Pure modules only: no llama_cpp, no HTTP, no kopf. The operator imports this subpackage and nothing
else from the runtime, so it must stay importable (and fast) without the runtime's extras.

* :mod:`.gguf_header`: a bounded reader of GGUF headers (metadata and tensor table, no tokenizer).
* :mod:`.model_info`: :class:`ModelInfo`, from a GGUF file, a URL or explicit metadata.
* :mod:`.architectures`: llama.cpp's per-architecture rules: which layers keep a KV cache, of what
  width, which keep recurrent state, which slide a window.
* :mod:`.memory`: the bytes llama.cpp allocates for a model, a context and its slots.
* :mod:`.planner`: how many GPUs a replica needs and how many slots fit on them.
* :mod:`.gpu_catalog`, :mod:`.presets`: GPU products and named model shapes.
"""
