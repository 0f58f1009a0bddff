"""LoRA-TLE: token-level mixing of pretrained PEFT LoRA adapters (Belofsky 2023).

N LoRA adapters trained on different tasks for the same base model become the N experts
of one :class:`~datalora.layers.MoLoRALinear` per adapted layer. Routing has no trainable
parameters: the context so far is embedded (mean-pooled base hidden states, or a sentence
embedder when installed), compared by cosine similarity with each adapter's dataset
centroid, and ``weights = softmax(cos / tau)``. The fused MoLoRA op mixes the experts'
*outputs* with those weights, which equals merging ``sum_i w_i dW_i`` into the base weight
for that token, so nothing is merged per token.

Routing is causal: the weights used at position ``t`` come from the context up to an
*anchor* position ``a(t) <= t`` (see :func:`anchor_positions`), so a KV cache stays exact
and a teacher-forced forward over a generated sequence reproduces generation's logits.
Three modes pick the anchor:

- ``"token"``: recomputed at every generated position (``a(t) = t``);
- ``"every_n"``: recomputed every ``n``-th generated position (the paper's best: n = 2);
- ``"prompt"``: once per prompt (``a(t) = P - 1``).

Prompt positions always use the whole prompt's weights (the prompt is known at prefill).

The context embedding pools the context up to the anchor: by default the mean over the
whole context; with a recency option of the embedder (``window``: the mean over the last
``window`` tokens; ``decay``: an exponentially weighted mean, see :func:`pool_prefixes`)
it follows a change of task within a sequence, and ``whole_weight`` keeps the whole
context in view beside it (:func:`blend_whole_context`). Either way it uses only tokens
``<= a(t)``, so the causal rule above holds. Centroids are fitted with the same pooling at
the end of each example prompt by default (``fit_centroids(..., pooling="context")``).

Adapters may differ in rank, alpha and target modules: ranks are zero-padded to the
largest, each adapter's ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA) is folded into
its ``B`` so one scaling (1) serves all, and a module an adapter does not adapt gets a
zero expert there.

Modules: :mod:`~datalora.tle.routing` (modes, anchors, weights),
:mod:`~datalora.tle.embedders` (context embeddings), :mod:`~datalora.tle.adapters` (PEFT
loading, packing, the mixed layer), :mod:`~datalora.tle.mixer` (the mixer) and
:mod:`~datalora.tle.cli` (``python -m datalora tle``).
"""

from datalora.tle.adapters import AdapterMixLinear, LoRAAdapter, load_peft_adapter, pack_adapters
from datalora.tle.cli import add_parser, run_cli
from datalora.tle.embedders import (
    HiddenStateEmbedder,
    SentenceEmbedder,
    blend_whole_context,
    check_recency,
    pool_prefixes,
)
from datalora.tle.mixer import MIXER_CONFIG, MIXER_WEIGHTS, TokenLevelAdapterMixer
from datalora.tle.routing import MODES, anchor_positions, recompute_positions, routing_weights

__all__ = [
    "MIXER_CONFIG",
    "MIXER_WEIGHTS",
    "MODES",
    "AdapterMixLinear",
    "HiddenStateEmbedder",
    "LoRAAdapter",
    "SentenceEmbedder",
    "TokenLevelAdapterMixer",
    "add_parser",
    "anchor_positions",
    "blend_whole_context",
    "check_recency",
    "load_peft_adapter",
    "pack_adapters",
    "pool_prefixes",
    "recompute_positions",
    "routing_weights",
    "run_cli",
]
