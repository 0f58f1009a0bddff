"""The embedded default model and tokenizer: a tiny random Mistral and a locally trained BPE.

No PyPI package ships a small causal LM and no model hub is reachable offline, so demos and
tests use a tiny Mistral-architecture model (random init, about 1 M parameters) and a
byte-level BPE tokenizer trained with ``tokenizers`` on the embedded dataset
(:mod:`datalora.data`). :func:`load_model_and_tokenizer` takes the same code path
(``AutoModelForCausalLM`` / ``AutoTokenizer``) for a real model given by local path or Hub
name; :func:`to_gpu_if_it_fits` then places such a CPU-loaded base on the GPU.

A second, different model + tokenizer pair (for adapter transfer across models) comes from
the same functions with other settings, e.g.
``build_tokenizer(vocab_size=512)`` and
``build_tiny_model(vocab_size=512, hidden_size=96, num_hidden_layers=3)``.

Adapter methods that assume a *pretrained* base (LoRA-TLE, TITOK) use
:func:`build_pretrained_tiny_model`: the same architecture after a short, cached,
deterministic causal-LM pretraining on the embedded train split (minus the validation rows
of :func:`train_validation_split`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows: build folders are judged by age
    fcntl = None
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from datalora.checks import check_int, check_number
from datalora.data import (
    format_prompt,
    load_instruction_dataset,
    looks_like_local_path,
    tokenize_example,
)
from datalora.io import cache_root

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILES",
    "UNK_TOKEN",
    "build_pretrained_tiny_model",
    "build_tiny_model",
    "build_tokenizer",
    "cast_model",
    "embedded_corpus",
    "check_tokenizer_source",
    "load_model_and_tokenizer",
    "tiny_mistral_config",
    "train_validation_split",
    "with_appended_eos",
]

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
"""Special tokens of the embedded tokenizer; their ids are their positions (0, 1, 2, 3)."""
DEFAULT_VOCAB_SIZE = 1024
"""Vocabulary size of the embedded tokenizer and model."""
MAX_POSITIONS = 512
_TOKENIZER_FORMAT = "datalora-bytelevel-bpe-v1"  # bump when the recipe below changes
_PRETRAIN_FORMAT = "datalora-pretrained-tiny-v1"  # bump when the pretraining recipe changes
EMBEDDED_NAMES = (None, "embedded")
VALIDATION_PER_TASK = 50
"""Rows per task that :func:`train_validation_split` holds out of the embedded train split."""


def embedded_corpus() -> list[str]:
    """Texts the embedded tokenizer is trained on: prompt + response of every train row."""
    return [format_prompt(r) + r["response"] for r in load_instruction_dataset("embedded")]


def _train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> Any:
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    # BOS before every sequence; offsets left untrimmed so they map to exact characters.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                      pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN, padding_side="right", clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS)


def build_tokenizer(cache_dir: str | os.PathLike[str] | None = None, *,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
                    texts: Iterable[str] | None = None) -> Any:
    """A byte-level BPE tokenizer trained locally with ``tokenizers``; deterministic.

    Trained on ``texts`` (default :func:`embedded_corpus`), with special tokens ``<unk>``
    (0), ``<s>`` (1, BOS, prepended by ``add_special_tokens=True``), ``</s>`` (2, EOS) and
    ``<pad>`` (3), right padding, exact round trip ``decode(encode(s),
    skip_special_tokens=True) == s`` and character offsets (``return_offsets_mapping``).

    It is saved with ``save_pretrained`` to ``cache_dir / "tokenizer-<hash>"`` (default
    cache root ``$DATALORA_CACHE`` or ``~/.cache/datalora``), the hash covering the texts
    and every setting, and always returned as reloaded from there by
    ``AutoTokenizer.from_pretrained`` (the path real tokenizers take). The cache write is
    atomic (build in a temp folder, then rename), so concurrent processes are safe.

    Args:
        cache_dir: cache root (default as above).
        vocab_size: target vocabulary size including the 4 special tokens (>= 260). The
            result has at most this many tokens (fewer when the texts allow no more merges).
        min_frequency: minimum pair count for a merge.
        texts: training texts.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5).
    """
    from transformers import AutoTokenizer

    min_vocab = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size: expected an int >= {min_vocab} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    min_frequency = check_int("min_frequency", min_frequency, low=1)
    if isinstance(texts, str):
        raise TypeError("texts: expected an iterable of strings, got a single str")
    corpus = embedded_corpus() if texts is None else list(texts)
    if not corpus or not all(isinstance(t, str) for t in corpus):
        raise TypeError("texts: expected a non-empty iterable of strings")
    import tokenizers

    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _TOKENIZER_FORMAT, "vocab_size": vocab_size,
                              "min_frequency": min_frequency, "special": SPECIAL_TOKENS,
                              "tokenizers": tokenizers.__version__}).encode())
    for text in corpus:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / f"tokenizer-{digest.hexdigest()[:16]}"
    return _cached(target, "tokenizer.json", lambda tmp: _train_tokenizer(
        corpus, vocab_size, min_frequency).save_pretrained(str(tmp)),
        lambda folder: AutoTokenizer.from_pretrained(str(folder)))


def with_appended_eos(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer (with BOS and EOS tokens) that appends EOS to every text
    it encodes with special tokens, as Llama-2 / Mistral tokenizers with
    ``add_eos_token=True`` do: for testing code paths such tokenizers take."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos, eos = tok.bos_token, tok.eos_token
    if bos is None or eos is None or not hasattr(tok, "_tokenizer"):
        raise ValueError("tokenizer: expected a fast tokenizer with BOS and EOS tokens")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id),
                                                  (eos, tok.eos_token_id)])
    return tok


# a build folder without a lock (fcntl missing) older than this is taken as left over from
# a killed process (SIGKILL skips cleanup)
_STALE_BUILD_S = 3600.0


def _cached(target: Path, marker: str, build: Any, load: Any) -> Any:
    """``load(target)`` of the cache entry ``target`` (:func:`_build_cached` first). An
    entry that does not load (a file damaged after the build: a full disk, a host crash)
    is discarded and built again, with a warning naming it."""
    _build_cached(target, marker, build)
    try:
        return load(target)
    except MemoryError:
        raise
    except Exception as exc:  # tokenizers raises bare Exceptions on a damaged file
        warnings.warn(f"datalora cache: {target} does not load ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); building it again", UserWarning, stacklevel=3)
        _discard(target)
        _build_cached(target, marker, build)
        return load(target)


def _discard(folder: Path) -> None:
    """Removes a cache folder: renamed aside first, so no reader sees it half deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.discarded.", dir=folder.parent))
    try:
        os.replace(folder, aside / folder.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _held_by_a_live_process(lock: Path) -> bool:
    """Whether another process holds the build lock ``lock`` (an ``fcntl`` lock is released
    when its process dies, SIGKILL included)."""
    try:
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except FileNotFoundError:  # the build finished meanwhile
        return True


def _remove_dead_builds(target: Path) -> None:
    """Removes the build folders of ``target`` that killed processes left: a folder whose
    lock no live process holds (without ``fcntl``: older than an hour)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        lock = stale.with_name(stale.name + ".lock")
        try:
            if stale.name.endswith(".lock"):
                if not stale.with_suffix("").exists():
                    stale.unlink(missing_ok=True)  # a lock whose build is gone
                continue
            if not stale.is_dir():
                continue
            if fcntl is not None and lock.exists():
                dead = not _held_by_a_live_process(lock)
            else:
                dead = time.time() - stale.stat().st_mtime > _STALE_BUILD_S
            if dead:
                shutil.rmtree(stale, ignore_errors=True)
                lock.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _build_cached(target: Path, marker: str, build: Any) -> None:
    """Runs ``build(tmp_folder)`` and renames the folder to ``target`` unless ``target /
    marker`` exists; atomic, so concurrent processes are safe (a lost race is fine). A
    ``target`` without its marker (left by a failure outside this function) is discarded,
    and the build folders of killed processes are removed (each build holds a lock)."""
    if (target / marker).is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(target)
    if (target / marker).is_file():  # another process finished it meanwhile
        return
    if target.exists():
        _discard(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    lock_path = tmp.with_name(tmp.name + ".lock")
    with open(lock_path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / marker).is_file():  # not a lost race: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def tiny_mistral_config(vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides: Any) -> Any:
    """``MistralConfig`` of the embedded model (about 1 M parameters at vocab 1024).

    hidden 128, 4 layers, 4 heads (head_dim 32), 2 KV heads, intermediate 344, 512
    positions, no sliding window, untied embeddings, and the embedded tokenizer's special
    ids (bos 1, eos 2, pad 3). ``overrides`` replace any ``MistralConfig`` field.
    """
    from transformers import MistralConfig

    vocab_size = check_int("vocab_size", vocab_size, low=1)
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        sliding_window=None, tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN))
    settings.update(overrides)
    return MistralConfig(**settings)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` as ``from_pretrained(dtype=...)`` would have built it: floating
    non-persistent buffers (rotary ``inv_freq``, computed in fp32) keep their dtype. Cast
    to bf16, ``inv_freq`` shifts rotary angles by up to ~1 rad at a few thousand positions,
    so a model cast whole differs from the same checkpoint loaded in bf16."""
    kept = [(module, name, buffer) for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and buffer.is_floating_point()
            and name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buffer in kept:
        module._buffers[name] = buffer
    return model


def build_tiny_model(seed: int = 0, vocab_size: int | None = None,
                     dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A randomly initialised tiny ``MistralForCausalLM`` (see :func:`tiny_mistral_config`).

    Deterministic in ``seed`` without touching the global RNG state. Returned in eval
    mode on the CPU, as ``from_pretrained`` returns models.

    Args:
        seed: init seed.
        vocab_size: default :data:`DEFAULT_VOCAB_SIZE` (matches :func:`build_tokenizer`).
        dtype: parameter dtype (initialised in fp32, then cast).
        overrides: ``MistralConfig`` fields (e.g. ``hidden_size=96, num_hidden_layers=3``).

    Returns:
        The model; ``model(input_ids [B, L]).logits`` is ``[B, L, vocab_size]``.
    """
    from transformers import MistralForCausalLM

    seed = check_int("seed", seed, error=TypeError)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    config = tiny_mistral_config(DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size,
                                 **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    return cast_model(model, dtype).eval()


def train_validation_split(rows: list[dict[str, str]] | None = None, *,
                           per_task: int = VALIDATION_PER_TASK
                           ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Splits training rows into (train, validation): the last ``per_task`` rows of each task
    are validation.

    Experiments tune on the validation rows and report on the eval split, which nothing
    trains or tunes on; :func:`build_pretrained_tiny_model` never sees the validation rows.

    Args:
        rows: rows with a ``task`` column (default: the embedded train split, 500 per task).
        per_task: validation rows per task (>= 0).

    Returns:
        ``(train_rows, validation_rows)``, each in the input order.
    """
    per_task = check_int("per_task", per_task, low=0)
    rows = load_instruction_dataset("embedded", "train") if rows is None else list(rows)
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row["task"], []).append(i)
    held = {i for idx in by_task.values() for i in idx[len(idx) - min(per_task, len(idx)):]}
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def _pretraining_examples(tokenizer: Any, max_length: int, with_responses: bool
                          ) -> list[dict[str, list[int]]]:
    """Every non-validation train row as plain text with the loss on every token: the prompt
    (BOS, system prompt, question, answer cue), plus response + EOS if ``with_responses``."""
    rows, _ = train_validation_split()
    examples = []
    for row in rows:
        ids = tokenize_example(row, tokenizer, max_length)["input_ids"] if with_responses \
            else list(tokenizer(format_prompt(row))["input_ids"])[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": list(ids)})
    return examples


def _pretrain_key(settings: dict[str, Any], tokenizer: Any,
                  examples: list[dict[str, list[int]]]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for ex in examples:
        digest.update(json.dumps(ex["input_ids"]).encode())
    return digest.hexdigest()[:16]


def build_pretrained_tiny_model(seed: int = 0, vocab_size: int | None = None, *,
                                tokenizer: Any = None, with_responses: bool = False,
                                steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
                                max_length: int = 128,
                                cache_dir: str | os.PathLike[str] | None = None,
                                dtype: torch.dtype = torch.float32, progress: bool = True,
                                **overrides: Any) -> Any:
    """:func:`build_tiny_model` after a short causal-LM pretraining (cached, deterministic).

    The papers behind LoRA-TLE and TITOK adapt a *pretrained* base; a random base gives the
    adapters nothing to build on (a LoRA must learn the vocabulary and the prompt format by
    itself, and TITOK's contrastive excess is then large on every token). The pretraining
    corpus is the *prompts* of the embedded train split -- system prompt, question and answer
    cue of every row of all four tasks, minus the validation rows of
    :func:`train_validation_split` -- with the next-token loss on every token, like a
    language model that has read the questions but was never instruction-tuned. The base
    thus knows the vocabulary, the format and each task's question distribution, while the
    answering (what comes after ``### Answer:``) is left to the adapters. Pretraining on
    prompt + response instead (``with_responses=True``) was tried: the base then learns what
    this tiny model can learn of every task, and a task LoRA adds almost nothing on the
    validation rows (mean response loss 2.97 with the LoRA vs 3.01 without), so neither
    mixing nor transfer has anything to show.

    Budget: 600 steps of 32 rows (~11 passes over the 1800 prompts), a few minutes on
    one CPU core for the default model; cached afterwards.

    Training: full fine-tune with AdamW (:func:`datalora.finetune.optimisation_steps`,
    linear warmup over a tenth of the steps, batch order seeded by ``seed``), fp32 on the
    CPU. The weights (``model.safetensors``) and a ``pretrain.json`` record are cached
    under ``cache_dir / "pretrained-<hash>"`` (default cache root as for
    :func:`build_tokenizer`), the hash covering every setting, the tokenizer's vocabulary
    and the token ids of the corpus; later calls load them (atomic write, as for the
    tokenizer).

    Args:
        seed: init seed of :func:`build_tiny_model` and seed of the batch order.
        vocab_size: model vocabulary (default :data:`DEFAULT_VOCAB_SIZE`).
        tokenizer: encodes the corpus (default ``build_tokenizer(cache_dir,
            vocab_size=vocab_size)``); must fit in ``vocab_size``.
        with_responses: also pretrain on each row's response + EOS (see above).
        steps: optimisation steps (>= 1); batch_size: rows per step; lr: peak AdamW rate.
        max_length: token limit per row.
        dtype: dtype of the returned model (trained in fp32, then cast).
        progress: show a progress bar while training.
        overrides: ``MistralConfig`` fields, as for :func:`build_tiny_model`.

    Returns:
        The model in eval mode on the CPU; ``model(input_ids [B, L]).logits`` is
        ``[B, L, vocab_size]``.
    """
    from safetensors.torch import load_file, save_file

    from datalora.finetune import optimisation_steps

    steps = check_int("steps", steps, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    max_length = check_int("max_length", max_length, low=1)
    check_number("lr", lr, low=0, low_inclusive=False)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    model = build_tiny_model(seed=seed, vocab_size=vocab, **overrides)
    if tokenizer is None:
        tokenizer = build_tokenizer(cache_dir, vocab_size=vocab)
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer: has {len(tokenizer)} tokens, more than vocab_size "
                         f"{vocab}")
    examples = _pretraining_examples(tokenizer, max_length, with_responses)
    settings = {"format": _PRETRAIN_FORMAT, "seed": seed, "vocab_size": vocab,
                "with_responses": with_responses,
                "overrides": overrides, "steps": steps, "batch_size": batch_size, "lr": lr,
                "max_length": max_length}
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / f"pretrained-{_pretrain_key(settings, tokenizer, examples)}"

    def pretrain(folder: Path) -> None:
        from datalora.data import CausalLMCollator

        losses = [loss.item() for _, _, loss in optimisation_steps(
            model, CausalLMCollator(tokenizer=tokenizer), examples, steps=steps,
            batch_size=batch_size, lr=lr, seed=seed, weight_decay=0.01, warmup=True,
            progress=progress, desc="pretraining tiny model")]
        save_file(model.state_dict(), str(folder / "model.safetensors"))
        tail = losses[-min(20, len(losses)):]
        (folder / "pretrain.json").write_text(json.dumps(
            {"settings": settings, "first_loss": losses[0],
             "last_loss": sum(tail) / len(tail)}, indent=1, default=str))

    _cached(target, "model.safetensors", pretrain,
            lambda folder: model.load_state_dict(load_file(str(folder / "model.safetensors"))))
    return cast_model(model, dtype).eval()


TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json",
                                    "tokenizer.model", "vocab.json", "spiece.model")
"""Files a saved tokenizer has at least one of (``save_pretrained`` writes the first two)."""


def _local_folder(name_or_path: str | os.PathLike[str], arg: str) -> Path | None:
    """The local path ``name_or_path`` names; None for a Hub name. A name that looks like a
    local path (:func:`~datalora.data.looks_like_local_path`) and does not exist is a
    FileNotFoundError naming ``arg`` (``name_or_path``: the model's, else the tokenizer's)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected None, 'embedded', a path or a Hub name, "
                        f"got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if looks_like_local_path(name_or_path):
        what = "model" if arg == "name_or_path" else "tokenizer"
        raise FileNotFoundError(f"{arg}: no such {what} folder: {path}")
    return None


def check_tokenizer_source(name_or_path: str | os.PathLike[str] | None,
                           tokenizer: Any = None) -> None:
    """Fails before anything loads when the tokenizer :func:`load_model_and_tokenizer`
    would read is missing: a ``tokenizer`` name that looks like a local path and does not
    exist, or a local folder (``tokenizer``, else the model's) without
    :data:`TOKENIZER_FILES`. A loaded tokenizer object passes."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return  # a loaded tokenizer
    arg, source = (("name_or_path", name_or_path) if tokenizer is None
                   else ("tokenizer", tokenizer))
    if source in EMBEDDED_NAMES:
        return
    folder = _local_folder(source, arg)
    if folder is not None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # only `datalora train` has a --tokenizer flag: demo / tle / titok users need the
        # tokenizer files in the model folder
        hint = ("save the tokenizer with the model (tokenizer.save_pretrained) or pass "
                "tokenizer= (datalora train: --tokenizer) with a folder or Hub name that "
                "has one"
                if tokenizer is None else "expected a folder written by save_pretrained")
        raise ValueError(f"{arg}: {folder} has no tokenizer (none of {list(TOKENIZER_FILES)}); "
                         f"{hint}")


def _hub_error(arg: str, source: str, exc: OSError) -> OSError:
    """The error for a name that is not a local folder and failed to load from the Hub."""
    return OSError(f"{arg}: {source!r} is not a local folder (no such path: "
                   f"{Path(source).absolute()}) and loading it from the Hugging Face Hub "
                   f"failed: {exc}")


def _load_tokenizer(source: Any, arg: str) -> Any:
    """The tokenizer of ``source`` (argument ``arg``): the embedded one, a loaded tokenizer
    as is, or ``AutoTokenizer.from_pretrained`` of a folder or Hub name."""
    if source in EMBEDDED_NAMES:
        return build_tokenizer()
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    path = _local_folder(source, arg)
    try:
        return AutoTokenizer.from_pretrained(str(source if path is None else path))
    except OSError as exc:
        if path is not None:
            raise
        raise _hub_error(arg, str(source), exc) from exc


def _model_source(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The name to load a model from and whether it is a local folder (which must hold
    ``config.json``); checked before anything loads."""
    path = _local_folder(name_or_path, "name_or_path")
    if path is None:
        return str(name_or_path), False
    if not (path / "config.json").is_file():
        raise ValueError(f"name_or_path: {path} is not a model folder (no config.json; "
                         f"expected a folder written by save_pretrained)")
    return str(path), True


def _load_model(source: str, local: bool, dtype: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a :func:`_model_source`; dtype None:
    the checkpoint's."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype="auto" if dtype is None else dtype)
    except OSError as exc:
        if local:
            raise
        raise _hub_error("name_or_path", source, exc) from exc


def _embedded_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The embedded model's dtype: fp32 by default, a torch dtype or its name."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype or its name, got {dtype!r}")
        return resolved
    return dtype


# the 16-bit base plus its NF4 copies (about 0.28 of it) and some working room
QUANTIZE_GPU_HEADROOM = 1.35


def to_gpu_if_it_fits(model: torch.nn.Module, headroom: float, purpose: str,
                      otherwise: str) -> bool:
    """Moves a CPU-resident ``model`` to this process's GPU (``LOCAL_RANK``) when
    ``headroom`` times its parameters' bytes fit the GPU's free memory; returns whether it
    moved. No GPU or a model already placed: nothing moves. Too big: a warning naming
    ``purpose`` (why it should move) and ``otherwise`` (what happens instead). Training
    moves a CPU-loaded base before NF4-quantizing it (minutes on a CPU for a 7B base,
    seconds on a GPU; the Trainer would move it next anyway)."""
    if not torch.cuda.is_available():
        return False
    if {p.device.type for p in model.parameters()} != {"cpu"}:
        return False
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    need = headroom * sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        warnings.warn(f"model: the base needs about {need / 2**30:.1f} GiB on {device} "
                      f"{purpose} and {free / 2**30:.1f} GiB are free; {otherwise}",
                      stacklevel=3)
        return False
    model.to(device)
    return True


def load_model_and_tokenizer(name_or_path: str | os.PathLike[str] | None = None,
                             dtype: torch.dtype | str | None = None,
                             tokenizer: Any = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` or ``"embedded"``: the tiny random model + the embedded
            tokenizer (:func:`build_tiny_model`, :func:`build_tokenizer`). Otherwise a local
            folder or a Hub model name, loaded with ``AutoModelForCausalLM.from_pretrained``
            and ``AutoTokenizer.from_pretrained``.
        dtype: model dtype; ``None``: fp32 for the embedded model, the checkpoint's dtype
            (``"auto"``) otherwise.
        tokenizer: where the tokenizer comes from instead (for a model folder saved
            without one): a local folder or Hub name, or a loaded tokenizer.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. A tokenizer without a pad token
        gets ``pad_token = eos_token`` (also set as the model's ``pad_token_id``).

    Raises:
        FileNotFoundError: ``name_or_path`` or ``tokenizer`` looks like a local path that
            does not exist (:func:`~datalora.data.looks_like_local_path`).
        ValueError: ``name_or_path`` is a local folder without ``config.json``, or the
            tokenizer's folder (``tokenizer``, else the model's) has none of
            :data:`TOKENIZER_FILES`.
        OSError: the model could not be loaded (e.g. a Hub name while offline; the message
            says when no local folder of that name exists).
    """
    source = None if name_or_path in EMBEDDED_NAMES else _model_source(name_or_path)
    check_tokenizer_source(name_or_path, tokenizer)
    tokenizer = (_load_tokenizer(name_or_path, "name_or_path") if tokenizer is None
                 else _load_tokenizer(tokenizer, "tokenizer"))
    model = (build_tiny_model(dtype=_embedded_dtype(dtype)) if source is None
             else _load_model(*source, dtype))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer: the tokenizer of {name_or_path!r} has neither a pad "
                             f"nor an eos token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
