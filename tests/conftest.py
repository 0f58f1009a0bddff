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


class RunMergingTokenizer:
    """Characters as ids (``ord + 10``), except that a run of whitespace is one token (id
    1), so a response of spaces merges into the prompt's closing newline; character offsets
    on request; ``adds_eos``: with special tokens, every text ends with EOS (id 2), as an
    ``add_eos_token`` tokenizer's."""

    eos_token_id = 2
    bos_token_id = None

    def __init__(self, adds_eos: bool = False) -> None:
        self.adds_eos = adds_eos

    @staticmethod
    def spans(text):
        import re

        return [(m.start(), m.end()) for m in re.finditer(r"\s+|\S", text)]

    def ids(self, text):
        """The ids of ``text`` without special tokens."""
        return [1 if text[a:b].isspace() else ord(text[a]) + 10 for a, b in self.spans(text)]

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        eos = self.adds_eos and add_special_tokens

        def encode(text):
            out = {"input_ids": self.ids(text) + [self.eos_token_id] * eos}
            if return_offsets_mapping:
                out["offset_mapping"] = self.spans(text) + [(0, 0)] * eos
            return out
        if isinstance(texts, str):
            return encode(texts)
        encs = [encode(t) for t in texts]
        return {key: [e[key] for e in encs] for key in encs[0]}


@pytest.fixture
def run_merging_tokenizer():
    """:class:`RunMergingTokenizer` (call it: ``run_merging_tokenizer(adds_eos=True)``)."""
    return RunMergingTokenizer


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
