"""The runtime's HTTP surface: OpenAI and Ollama routes, health probes and /metrics (aiohttp).

:mod:`.app` holds the application and the plumbing every route shares, :mod:`.openai` and
:mod:`.ollama` the routes of each dialect, :mod:`.common` the errors, request bounds and model card
they share.
"""

from .app import RuntimeAPI
from .common import ApiError, ModelCard, RequestLimits

__all__ = ["ApiError", "ModelCard", "RequestLimits", "RuntimeAPI"]
