"""TITOK: transplant a LoRA adapter to another base model through token-level signals.

Pipeline (seeds/titok_summary.txt):

1. :func:`generate_synthetic` -- the source model *with* its LoRA answers seed prompts
   (sampling), giving synthetic (prompt, response) rows without the original data.
2. :func:`contrastive_excess` -- per response token ``y_t`` (EOS included)
   ``excess_t = log p_source+LoRA(y_t | y_<t) - log p_source(y_t | y_<t)``: how much the
   adapter contributes to that token.
3. :func:`select_samples` keeps the samples with the largest mean excess (a fraction);
   :func:`select_tokens` keeps the top fraction of tokens of each kept sample; the kept
   tokens form the loss mask.
4. :func:`align_token_scores` -- when the target's tokenizer differs, each target token
   takes the scores of the source tokens whose character spans overlap it.
5. :func:`train_masked` trains a fresh LoRA (PEFT) or MoLoRA on the target with that mask.

:func:`titok_transfer` runs all five steps.

Modules: :mod:`~datalora.titok.synthetic` (1), :mod:`~datalora.titok.excess` (2),
:mod:`~datalora.titok.selection` (3), :mod:`~datalora.titok.alignment` (4 and the masked
examples), :mod:`~datalora.titok.transfer` (5 and :func:`titok_transfer`) and
:mod:`~datalora.titok.cli` (``python -m datalora titok``).
"""

from datalora.titok.alignment import align_token_scores, build_masked_examples, tile_spans
from datalora.titok.cli import add_parser, run_cli
from datalora.titok.excess import (
    ScoredSample,
    adapter_disabled,
    contrastive_excess,
    disabled_is_not_base,
    response_log_probs,
    response_offsets,
)
from datalora.titok.selection import select_samples, select_tokens
from datalora.titok.synthetic import generate_synthetic
from datalora.titok.transfer import check_target_modules, titok_transfer, train_masked

__all__ = [
    "ScoredSample",
    "adapter_disabled",
    "add_parser",
    "align_token_scores",
    "build_masked_examples",
    "check_target_modules",
    "contrastive_excess",
    "disabled_is_not_base",
    "generate_synthetic",
    "response_log_probs",
    "response_offsets",
    "run_cli",
    "select_samples",
    "select_tokens",
    "tile_spans",
    "titok_transfer",
    "train_masked",
]
