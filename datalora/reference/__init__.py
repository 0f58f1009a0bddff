"""Plain-torch references: the contract every backend is tested against."""

from datalora.reference.molora import (
    gather_tokens_reference,
    molora_delta_reference,
    molora_linear_reference,
    scatter_tokens_reference,
)

__all__ = [
    "gather_tokens_reference",
    "molora_delta_reference",
    "molora_linear_reference",
    "scatter_tokens_reference",
]
