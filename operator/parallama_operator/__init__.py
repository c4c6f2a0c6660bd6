"""parallama's Kubernetes operator (kopf).

Importing the package registers every handler with kopf's default registry, so both
``kopf run -m parallama_operator`` and ``parallama operator`` (see :mod:`parallama_operator.main`) work.
"""

from . import handlers as handlers
