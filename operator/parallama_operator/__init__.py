"""parallama's Kubernetes operator (kopf)."""
