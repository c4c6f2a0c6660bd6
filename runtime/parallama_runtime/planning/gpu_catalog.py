"""Memory of common NVIDIA data-centre and workstation GPUs, for nodes without a memory label.

GPU Feature Discovery labels a node with ``nvidia.com/gpu.product`` (for example
``NVIDIA-L4`` or ``NVIDIA-A100-SXM4-80GB``) and usually ``nvidia.com/gpu.memory`` in MiB. When the
memory label is missing, the product name is matched against this table. Values are the memory the
driver reports as total (MiB), which is a little below the marketing number.
"""

from __future__ import annotations

import re

__all__ = ["GPU_CATALOG", "lookup_gpu_memory_mib", "normalize_product"]

GPU_CATALOG: dict[str, int] = {
    "T4": 15360,
    "L4": 23034,
    "A10": 23028,
    "A10G": 23028,
    "A16": 15356,
    "A30": 24576,
    "A40": 46068,
    "L20": 46068,
    "L40": 46068,
    "L40S": 46068,
    "A100-40GB": 40960,
    "A100-80GB": 81920,
    "H100": 81559,
    "H100-NVL": 95830,
    "H20": 97871,
    "H200": 143771,
    "B200": 183359,
    "V100": 16384,
    "V100-32GB": 32768,
    "RTX-3090": 24576,
    "RTX-4090": 24564,
    "RTX-5090": 32607,
    "RTX-A6000": 49140,
    "RTX-6000-ADA": 49140,
}


def normalize_product(product: str) -> str:
    """``NVIDIA-A100-SXM4-80GB`` -> ``A100-80GB``; ``nvidia geforce rtx 4090`` -> ``RTX-4090``."""
    name = product.upper().replace("_", "-").replace(" ", "-")
    name = re.sub(r"^(NVIDIA-)?(GEFORCE-|TESLA-|QUADRO-)?", "", name)
    name = re.sub(r"-(SXM\d?|PCIE|HBM\d?E?|MIG.*|SHARED)", "", name)
    return name


def lookup_gpu_memory_mib(product: str) -> int | None:
    """Total memory (MiB) of a GPU product, or None when the product is unknown."""
    name = normalize_product(product)
    if name in GPU_CATALOG:
        return GPU_CATALOG[name]
    if name.startswith("A100"):
        return GPU_CATALOG["A100-80GB" if "80" in name else "A100-40GB"]
    if name.startswith("H100") and "NVL" in name:
        return GPU_CATALOG["H100-NVL"]
    # longest catalog key that prefixes the name: "L40S-48GB" -> L40S
    for key in sorted(GPU_CATALOG, key=len, reverse=True):
        if name.startswith(key):
            return GPU_CATALOG[key]
    return None
