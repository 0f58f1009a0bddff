"""Shared fixtures: deterministic seeds, the ``gpu`` marker skip and a SentencePiece-style
(Metaspace) tokenizer.

Without CUDA, Triton kernels run under its interpreter. ``TRITON_INTERPRET=1`` has to be
set before anything imports Triton (bitsandbytes and PEFT do, at import time), so it is
set here, in the first module pytest loads. ``backend="auto"`` still picks torch on the
CPU; tests that need the plain environment (the GPU compile check) use a subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """A BPE with Llama / Mistral's Metaspace pre-tokenizer (``prepend_scheme="first"``: a
    text encoded on its own starts with "▁") and, as in their vocabularies, no merges
    across a newline; trained on the embedded corpus, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from datalora.testing import embedded_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(embedded_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
