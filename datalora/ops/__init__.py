"""Functional MoLoRA ops with backend dispatch (the README's API section)."""

from datalora.ops.backends import (
    BackendUnavailableError,
    available_backends,
    resolve_backend,
)
from datalora.ops.molora import molora_delta, molora_linear
from datalora.ops.tokens import gather_tokens, scatter_tokens

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "gather_tokens",
    "molora_delta",
    "molora_linear",
    "resolve_backend",
    "scatter_tokens",
]
