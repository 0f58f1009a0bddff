"""Token pruning over a decoder-layer range, steered by the saliency network.

:class:`DATALORARuntime` hooks a Hugging Face decoder (Mistral / Llama / Qwen style:
``model.model.layers[i](hidden, attention_mask=, position_ids=, cache=, use_cache=,
position_embeddings=)``; ``past_key_values=`` before transformers 5.24) without changing its
modules or parameter names:

1. before decoder layer 0 the :class:`~datalora.saliency.UnifiedSaliencyNetwork` runs once
   on the hidden states -> token scores, and one :class:`~datalora.routing.Routing` that
   every :class:`~datalora.layers.MoLoRALinear` receives through a forward pre-hook;
2. at the first pruned layer each sequence keeps ``ceil(retention * n)`` of its ``n`` real
   tokens (highest score, Gumbel noise in training; the last real token is always kept,
   padding never) -- :func:`select_tokens`; kept tokens are packed with
   :func:`datalora.ops.gather_tokens` and run through the range with their original
   position ids, each layer's own RoPE cos/sin (and other per-token inputs,
   :data:`PER_TOKEN_INPUTS`) gathered to the kept tokens and a causal mask over kept
   positions (:func:`packed_attention_mask`); the MoLoRA layers get the routing rows of
   the kept tokens (gathered once);
3. after the range :func:`datalora.ops.scatter_tokens` writes kept rows back with the keep
   weight ``w = 1 + p - stopgrad(p)`` (``p = sigmoid(score)``): exactly 1 in the
   forward, the Mixture-of-Depths gradient ``dL/dp = g . (f(h) - h)`` in the backward;
   pruned tokens bypass the range on the residual stream.

With a KV cache (``generate``) per-sequence top-k is not causal, so a token is kept when
its score exceeds the calibrated ``keep_threshold`` (:meth:`DATALORARuntime.calibrate`);
a pruned token's keys are hidden from every later query by a mask over the cached
positions, so every cached K/V of a kept token is what the uncached threshold forward
computes and the cache stays exact (the keep flags of cached tokens live on the cache
object). A cached forward of several tokens (a prompt, a chunk of one, assisted decoding's
drafts) runs the pruned layers packed on its kept tokens, their keys / values written at
their positions and zeros at the pruned ones; a cached step whose every row is pruned
(batch-1 decoding, typically) skips the pruned layers, appending zeros; otherwise (a
decode step keeping some rows' token, a cache other than a plain ``DynamicCache``,
attention maps requested) they run on every new token and the bypass replaces their
output at pruned ones. Beam search and assisted decoding work: the keep flags and the
saliency network's running context follow the cache's row operations and ``crop``. An
uncalibrated threshold runs the range dense in eval forwards that decide token by token
(``generate`` passes ``use_cache``, with or without a cache), on both paths.

Modules: :mod:`~datalora.pruning.selection` (which tokens, the masks, the threshold),
:mod:`~datalora.pruning.decoder` (the decoder stack and what it must allow),
:mod:`~datalora.pruning.cache_state` (the state a KV cache carries),
:mod:`~datalora.pruning.runtime` (the hooks).
"""

# caches pickled by earlier releases refer to datalora.pruning._RowsFollow
from datalora.pruning.cache_state import _RowsFollow  # noqa: F401
from datalora.pruning.decoder import (
    PER_TOKEN_INPUTS,
    check_prunable,
    check_prune_range,
    find_decoder_layers,
    layer_window,
    resolve_prune_range,
)
from datalora.pruning.runtime import (
    GRADIENT_CHECKPOINTING_REFUSED,
    DATALORARuntime,
    ForwardRecord,
)
from datalora.pruning.selection import (
    COMPILED_WIDTH_STEPS,
    TokenSelection,
    compiled_width_fraction,
    keep_count,
    packed_attention_mask,
    select_tokens,
)

__all__ = ["COMPILED_WIDTH_STEPS", "GRADIENT_CHECKPOINTING_REFUSED", "PER_TOKEN_INPUTS",
           "DATALORARuntime", "ForwardRecord", "TokenSelection", "check_prunable",
           "check_prune_range", "compiled_width_fraction", "find_decoder_layers",
           "keep_count", "layer_window", "packed_attention_mask", "resolve_prune_range",
           "select_tokens"]
