"""parallama's model server and the memory model and planner it owns.

Layering (see docs/design.md): ``model_info``, ``memory``, ``planner`` and ``gpu_catalog`` are pure
and import nothing heavy; the engine (llama.cpp), the HTTP API and the metrics are separate modules
that only the server wires together.
"""

__version__ = "0.1.0"
