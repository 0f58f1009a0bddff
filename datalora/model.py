"""Inject MoLoRA into a Hugging Face causal LM, and save / load the adapter.

``get_datalora_model(model, config)`` swaps every targeted ``nn.Linear`` for a
:class:`~datalora.layers.MoLoRALinear`, freezes the base and returns a
:class:`DATALORAModel` wrapper with PEFT-style ``save_pretrained`` /
``from_pretrained``. The adapter is written as ``adapter_model.safetensors`` +
``adapter_config.json``; both writes are atomic and reload is bit-exact. Which layers are
adapted, and what shared routing needs of the model: :mod:`datalora.injection`; the checks
of a saved folder: :mod:`datalora.adapter_files`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from datalora.adapter_files import (
    BASE_PARAMETERS_KEY,
    WEIGHTS_NAME,
    check_adapter_fits,
    check_declared_base_parameters,
    check_not_a_file,
    check_path,
    config_from_json,
    function_fields,
    weights_file,
    without_wrapper_names,
)
from datalora.checks import as_scalar, check_bool, check_flag, check_int, check_number
from datalora.cli import check_output_folder
from datalora.config import CONFIG_NAME, DATALORAConfig
from datalora.hf_compat import transformers_major
from datalora.injection import (
    auto_routing,
    check_shared,
    check_types,
    hidden_size_of,
    inject_molora,
    parameter_elements,
)
from datalora.io import (
    atomic_write_text,
    check_saved_weight,
    load_metadata,
    load_tensors,
    save_tensors,
)
from datalora.layers import MoLoRALinear, adapters_off
from datalora.nf4_linear import NF4Linear
from datalora.pruning import (
    GRADIENT_CHECKPOINTING_REFUSED,
    DATALORARuntime,
)
from datalora.saliency import UnifiedSaliencyNetwork
from datalora.sharding import (
    copy_full_into,
    full_tensors,
    sharding_kind,
    unwrapped_name,
)


def __getattr__(name: str):
    # DATALORACausalLMOutput subclasses a transformers class: built on first use, so that
    # `import datalora` does not import transformers (about 1 s)
    if name == "DATALORACausalLMOutput":
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return output_with_aux_losses(CausalLMOutputWithPast)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_AUX_OUTPUT_CLASSES: dict[type, type] = {}  # output class -> its aux-loss subclass


def output_with_aux_losses(output_class: type) -> type:
    """``output_class`` (a ``ModelOutput`` dataclass: ``CausalLMOutputWithPast``,
    ``MoeCausalLMOutputWithPast``, ...) with ``retention_loss`` and ``balance_loss`` fields
    (0-dim tensors); ``DATALORACausalLMOutput`` for ``CausalLMOutputWithPast``. Made once
    per class and kept in a plain dict, which ``torch.compile`` reads as a constant (it
    cannot trace a class being made: :class:`DATALORAModel` makes the usual ones when it is
    built)."""
    cls = _AUX_OUTPUT_CLASSES.get(output_class)
    if cls is None:
        cls = _AUX_OUTPUT_CLASSES[output_class] = _aux_output_class(output_class)
    return cls


def _aux_output_class(output_class: type) -> type:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    name = ("DATALORACausalLMOutput" if output_class is CausalLMOutputWithPast
            else f"DATALORA{output_class.__name__}")
    namespace = {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"``{output_class.__name__}`` + the unweighted DATALORA aux losses "
                   f"(0-dim tensors).",
        "__annotations__": {"retention_loss": torch.Tensor | None,
                            "balance_loss": torch.Tensor | None},
        "retention_loss": None, "balance_loss": None}
    cls = dataclass(type(name, (output_class,), namespace))
    globals().setdefault(name, cls)  # picklable by name (this module's attribute)
    return cls


def _make_aux_output_classes() -> None:
    """:func:`output_with_aux_losses` of the causal-LM outputs of transformers' decoder
    models (dense and MoE)."""
    from transformers import modeling_outputs

    for name in ("CausalLMOutputWithPast", "MoeCausalLMOutputWithPast"):
        output_class = getattr(modeling_outputs, name, None)
        if output_class is not None:
            output_with_aux_losses(output_class)


def _check_base(model: object, config: object) -> None:
    """``model`` a module without MoLoRA layers, ``config`` a :class:`DATALORAConfig`: the
    checks of every way a base is adapted (get_datalora_model, the constructor,
    from_pretrained)."""
    model = check_types(model, config)
    config.validate()  # fields assigned after construction
    if isinstance(model, DATALORAModel) or any(isinstance(m, MoLoRALinear)
                                               for m in model.modules()):
        raise ValueError("model: already holds MoLoRA layers (get_datalora_model and "
                         "DATALORAModel.from_pretrained adapt their model in place); pass a "
                         "freshly loaded base model")


class DATALORAModel(nn.Module):
    """A causal LM with MoLoRA layers; forwards every call and attribute to the base model.

    With ``config.routing == "shared"`` a :class:`UnifiedSaliencyNetwork` (``self.saliency``)
    runs once per forward before the first decoder layer; its routing drives every MoLoRA
    layer and its token scores prune tokens over ``config.prune_layers``
    (:class:`~datalora.pruning.DATALORARuntime`, ``self.runtime``); ``routing='auto'`` (the
    default) is resolved here (see :func:`~datalora.injection.auto_routing`) and ``config``
    holds the result.
    A new model routes hard at ``tau = temperature_final`` and keeps every token (an
    untrained saliency network's scores mean nothing, and with B = 0 the model then equals
    its base); the trainer's curriculum takes over and training ends in the inference state
    (``retention = target_retention``); :meth:`load_adapter` restores the state saved with
    the adapter.

    Attributes:
        base_model: the wrapped model (its targeted linears are now MoLoRALinear).
        datalora_config: the :class:`DATALORAConfig` used to build it (``config`` is the
            base model's, e.g. its ``MistralConfig``).
        saliency / runtime: the USN and the pruning hooks (None for per-layer routing).
    """

    def __init__(self, model: nn.Module, config: DATALORAConfig, *, progress: bool = False):
        """``progress``: a bar while the base's layers are quantized (``quantize="nf4"``:
        minutes for a 7B model on a CPU)."""
        _check_base(model, config)
        super().__init__()
        self.base_model = model
        self.config_datalora = config
        # base parameters a loaded adapter carried (trained with it): saved again with it
        self._saved_base_names: set[str] = set()
        # token embeddings at wrapping: resize_token_embeddings after it adds rows the
        # adapter's new tokens need, so the embeddings are then saved with the adapter
        self._embedding_rows = _embedding_rows(model)
        # the trainable adapters transformers' Trainer looks for on a quantized base (it
        # refuses an is_quantized model "without adapters" unless this is set, as PEFT does)
        self._hf_peft_config_loaded = True
        if config.routing == "auto":
            config = dataclasses.replace(
                config, routing=auto_routing(model, config))
            self.config_datalora = config
        if config.routing == "shared":  # refused before the model is changed
            check_shared(model, config)
        self.saliency: UnifiedSaliencyNetwork | None = None
        self.runtime: DATALORARuntime | None = None
        with _undone_on_failure(model) as built:  # the caller's model back as it came
            built.append(self)
            model.requires_grad_(False)
            self.adapted_modules = inject_molora(model, config, progress=progress)
            if config.routing == "shared":
                self._add_saliency(model, config)
        # the new MoLoRA layers and saliency network (and this wrapper) start in the base
        # model's mode: an eval-mode base (as from_pretrained returns it) stays deterministic
        self.train(model.training)

    def _add_saliency(self, model: nn.Module, config: DATALORAConfig) -> None:
        """The USN and the pruning hooks of shared routing."""
        _make_aux_output_classes()  # outside any compiled forward
        device = next(model.parameters()).device
        self.saliency = UnifiedSaliencyNetwork(
            hidden_size_of(model), config.num_lora_experts, config.lora_rank,
            config.num_active_experts, config.saliency_hidden_size,
            config.temperature_final).to(device)
        self.runtime = DATALORARuntime(model, self.saliency, config.prune_layers,
                                       target_retention=config.target_retention)
        self.set_curriculum_state(config.temperature_final, 1.0, True)

    @property
    def datalora_config(self) -> DATALORAConfig:
        return self.config_datalora

    @property
    def generation_config(self) -> Any:
        """The base model's ``generation_config`` (which its ``generate`` reads): assigning
        one here sets the base's."""
        return self.base_model.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base_model.generation_config = value

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False
                       ) -> int:
        """The base model's ``num_parameters`` plus the saliency network's (which lives on
        this wrapper, not in the base)."""
        own = [] if self.saliency is None else list(self.saliency.parameters())
        count = self.base_model.num_parameters(only_trainable=only_trainable,
                                               exclude_embeddings=exclude_embeddings)
        return count + sum(p.numel() for p in own if p.requires_grad or not only_trainable)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """The base model's ``get_memory_footprint`` plus the saliency network's bytes."""
        own = [] if self.saliency is None else [
            *self.saliency.parameters(), *(self.saliency.buffers() if return_buffers else ())]
        return (self.base_model.get_memory_footprint(return_buffers=return_buffers)
                + sum(t.numel() * t.element_size() for t in own))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """The base model's (per-layer routing); refused at once with shared routing, whose
        saliency / pruning hooks cannot be recomputed (it used to fail at the first
        training forward)."""
        self._checkpointing_enable("gradient_checkpointing_enable", *args, **kwargs)

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """transformers 5.x's name of :meth:`gradient_checkpointing_enable` (its Trainer
        calls this one), refused at once with shared routing as that is."""
        self._checkpointing_enable("activation_checkpointing_enable", *args, **kwargs)

    def _checkpointing_enable(self, method: str, *args, **kwargs) -> None:
        if self.runtime is not None:
            raise ValueError(GRADIENT_CHECKPOINTING_REFUSED)
        getattr(self.base_model, method)(*args, **kwargs)
        # the frozen embeddings' output must require grad, or a reentrant checkpoint (older
        # transformers' default) returns a loss without a graph (as PEFT does)
        enable = getattr(self.base_model, "enable_input_require_grads", None)
        if enable is not None and getattr(self.base_model, "_require_grads_hook", None) is None:
            enable()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; with shared routing in training mode the output also
        carries ``retention_loss`` and ``balance_loss`` (0-dim tensors, see
        :meth:`aux_losses`), so DDP sees the saliency network used in the graph."""
        from transformers.utils import ModelOutput

        try:
            outputs = self.base_model(*args, **kwargs)
        except IndexError as exc:  # an id past the embedding or the LM head: say which
            problem = out_of_vocabulary(self.base_model, kwargs.get(
                "input_ids", args[0] if args else None), kwargs.get("labels"))
            if problem is None:
                raise
            raise ValueError(problem) from exc
        if self.runtime is not None and self.training and torch.is_grad_enabled() \
                and isinstance(outputs, ModelOutput) and dataclasses.is_dataclass(outputs) \
                and self.runtime.own_last is not None:
            return output_with_aux_losses(type(outputs))(**outputs, **self.aux_losses())
        return outputs

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """``retention_loss`` (mean keep probability vs the current retention) and
        ``balance_loss`` (Switch ``E * sum f_e P_e``) of this thread's latest forward (of
        any thread's when this one ran none), unweighted."""
        from datalora.losses import balance_loss, retention_loss

        record = self.runtime.own_last if self.runtime is not None else None
        if record is None:
            raise ValueError("aux_losses: needs routing='shared' and a forward first")
        routing = record.routing
        return {"retention_loss": retention_loss(record.keep_prob, self.runtime.retention,
                                                 record.valid),
                "balance_loss": balance_loss(routing.router_probs, routing.expert_ids,
                                             record.valid.reshape(-1))}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``base_model.generate`` with the DATALORA hooks (greedy, sampling, beam search,
        assisted and prompt-lookup decoding).

        Assisted and prompt-lookup decoding work, also with a DATALORA model as the draft
        (the keep flags and the saliency network's running context follow the cache's
        ``crop``); self-speculative decoding (``assistant_early_exit``) is refused under
        shared routing, and so is chunked prefill (``prefill_chunk_size``) on transformers
        4.x (it calls the model's forward without the hooks). An
        uncalibrated ``keep_threshold`` runs the pruned layers dense (a warning), with and
        without the cache alike: the hooks decide, so ``base_model.generate`` does the same.
        In training mode (Gumbel-noised routing, noisy token selection, LoRA dropout) the
        output is random: a warning says to call ``model.eval()`` first. ``input_ids`` must
        be integer ids the model embeds and ``num_beams`` >= 1 (transformers failed deep
        inside on float ids, with an IndexError on ids past the vocabulary and a
        ZeroDivisionError for ``num_beams=0``).
        """
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        self._check_generate_inputs(ids)
        if kwargs.get("num_beams") is not None:  # a one-value tensor / numpy number as int
            kwargs["num_beams"] = check_int("num_beams", as_scalar(kwargs["num_beams"]), low=1)
        if self.training:
            warnings.warn("generate(): the model is in training mode, so routing and token "
                          "selection are noisy (Gumbel noise) and the output is random, and "
                          "cached output differs from uncached; call model.eval() before "
                          "generate()", stacklevel=2)
        runtime = self.runtime
        if runtime is None:
            return self.base_model.generate(*args, **kwargs)
        config = kwargs.get("generation_config")
        if config is None and len(args) > 1:  # generate(inputs, generation_config, ...)
            config = args[1]
        config = config or getattr(self.base_model, "generation_config", None)

        def asked(name: str) -> bool:
            return kwargs.get(name) is not None or getattr(config, name, None) is not None

        name = "assistant_early_exit"
        if asked(name):
            raise ValueError(f"{name}: self-speculative decoding drafts with the first "
                             f"decoder layers alone, which the saliency network and the pruned "
                             f"layer range do not support; use assistant_model or "
                             f"prompt_lookup_num_tokens")
        name = "prefill_chunk_size"
        if asked(name) and transformers_major() < 5:
            raise ValueError(f"{name}: transformers 4.x prefills the chunks by calling the "
                             f"model's forward without its hooks, which the saliency network "
                             f"runs from; leave it out, or use transformers >= 5 (where "
                             f"chunked prefill works)")
        return self.base_model.generate(*args, **kwargs)

    def _check_generate_inputs(self, input_ids: Any) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.numel() == 0:
            return
        problem = out_of_vocabulary(self.base_model, input_ids)  # one sync per call
        if problem is not None:
            raise ValueError(problem)

    def set_curriculum_state(self, tau: float | None = None, retention: float | None = None,
                             hard: bool | None = None) -> None:
        """Sets the saliency temperature, the pruning retention and hard routing."""
        if self.saliency is None:
            raise ValueError("routing: set_curriculum_state needs routing='shared' (a saliency "
                             "network), this model routes per layer")
        if tau is not None:  # finite: tau = inf made the routing uniform noise
            tau = check_number("tau", tau, low=0, low_inclusive=False)
        if hard is not None and not isinstance(hard, bool):  # bool("no") is True
            raise ValueError(f"hard: expected True or False, got {hard!r}")
        if retention is not None:
            self.runtime.set_retention(retention)
        if tau is not None:
            self.saliency.tau = tau
        if hard is not None:
            self.saliency.hard = hard

    def curriculum_state(self) -> dict[str, float | bool]:
        """``{"tau", "retention", "hard"}`` currently in effect."""
        if self.saliency is None:
            return {}
        return {"tau": self.saliency.tau, "retention": self.runtime.retention,
                "hard": self.saliency.hard}

    def molora_layers(self) -> Iterator[tuple[str, MoLoRALinear]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, MoLoRALinear):
                yield name, module

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Turns every MoLoRA layer's update and the token pruning on or off (off: the exact
        base model)."""
        check_bool("enabled", enabled)
        for _, layer in self.molora_layers():
            layer.adapter_enabled = enabled
        if self.runtime is not None:
            self.runtime.pruning_enabled = bool(enabled)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The exact base model inside the block, as PEFT's ``disable_adapter()``: MoLoRA
        updates and token pruning off; their previous settings come back after."""
        pruning = None if self.runtime is None else self.runtime.pruning_enabled
        with adapters_off([layer for _, layer in self.molora_layers()]):
            if self.runtime is not None:
                self.runtime.pruning_enabled = False
            try:
                yield
            finally:
                if self.runtime is not None:
                    self.runtime.pruning_enabled = pruning

    def _base_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        # the MoLoRA layers' own parameters (LoRA experts, per-layer routers), not base
        # parameters that merely share their names (a MoE base's ``...moe.router.weight``);
        # named without FSDP1 / checkpoint wrappers, as the state dict and the files name them
        own = self._molora_parameter_ids() | self._resized_embeddings()
        for name, p in self.base_model.named_parameters():
            name = unwrapped_name(name)
            if p.requires_grad or id(p) in own or name in self._saved_base_names:
                yield name, p

    def _trained_base_names(self) -> set[str]:
        """Names of the base parameters saved with the adapter (trained with it, or token
        embeddings resized after wrapping): what a load replaces in the base."""
        molora = self._molora_parameter_ids()
        return {name for name, p in self._base_adapter_parameters() if id(p) not in molora}

    def _molora_parameter_ids(self) -> set[int]:
        """ids of the MoLoRA layers' own parameters (not their ``base_layer``'s)."""
        return {id(p) for _, layer in self.molora_layers()
                for name, p in layer.named_parameters() if not name.startswith("base_layer.")}

    def _resized_embeddings(self) -> set[int]:
        """ids of the input / output embedding weights when ``resize_token_embeddings`` ran
        after wrapping (their new rows are not in any base checkpoint), else empty."""
        rows = _embedding_rows(self.base_model)
        if rows is None or rows == getattr(self, "_embedding_rows", rows):
            return set()
        return {id(weight) for weight in _embedding_weights(self.base_model)}

    def _adapter_keys(self) -> dict[str, str]:
        """Adapter tensor name (as saved) -> its name in ``self.state_dict()``."""
        keys = {name: f"base_model.{name}" for name, _ in self._base_adapter_parameters()}
        if self.saliency is not None:
            keys.update({f"saliency.{k}": f"saliency.{k}" for k in self.saliency.state_dict()})
        return keys

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (LoRA experts, routers, saliency network), by name: the live
        parameters and buffers (DTensor shards under FSDP2)."""
        tensors = dict(self._base_adapter_parameters())
        if self.saliency is not None:
            tensors.update({f"saliency.{k}": v for k, v in
                            self.saliency.state_dict(keep_vars=True).items()})
        return tensors

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; a 4-bit weight counts its elements (an
        :class:`NF4Linear`'s are buffers, a bnb ``Params4bit`` packs two per byte), as
        PEFT counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(parameter_elements(p) for p in self.parameters())
        total += sum(m.weight.numel for m in self.modules() if isinstance(m, NF4Linear))
        return trainable, total

    def print_trainable_parameters(self) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        line = (f"trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
        print(line)
        return line

    def save_pretrained(self, save_directory: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None, *,
                        is_main_process: bool = True, safe_serialization: bool = True,
                        **kwargs) -> None:
        """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` atomically.

        Args:
            save_directory: the folder to write (created if needed).
            state_dict: a full ``state_dict()`` of this model (names as in
                ``self.state_dict()``), e.g. the one ``transformers.Trainer`` gathers under
                FSDP (``FULL_STATE_DICT``) or DeepSpeed ZeRO-3; the adapter parameters are
                taken from it, buffers it lacks from the model.

        Under FSDP2 without ``state_dict`` the shards are gathered here: call it on every
        rank; rank 0 writes, and every rank returns once the files exist. Under FSDP1 pass
        the full ``state_dict``. ``is_main_process=False`` (as accelerate scripts pass on
        the other ranks) writes nothing; other Hugging Face keywords are ignored (a warning).
        """
        if not safe_serialization:
            raise ValueError("safe_serialization: datalora adapters are saved as safetensors "
                             "only")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"save_directory: expected a folder path (str or Path), got "
                            f"{type(save_directory).__name__}")
        if state_dict is not None and not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                            f"{type(state_dict).__name__}")
        check_output_folder("save_directory", save_directory)
        if kwargs:
            warnings.warn(f"save_pretrained: ignoring {sorted(kwargs)}", stacklevel=2)
        kind = sharding_kind(self)
        own = self.adapter_state_dict()
        if state_dict is not None:
            keys = self._adapter_keys()
            tensors = {name: state_dict[keys[name]] for name in own if keys[name] in state_dict}
            missing = [name for name in own  # buffers (never sharded) may come from `own`
                       if name not in tensors and isinstance(own[name], nn.Parameter)]
            if missing:
                raise ValueError(f"state_dict: lacks adapter tensors {missing[:5]} "
                                 f"({len(missing)} in all); expected this model's full state "
                                 f"dict (names like {keys[missing[0]]!r})")
            tensors = {name: tensors.get(name, own[name]) for name in own}
            _check_given_tensors(tensors, own, keys, shapes=kind is None)
        elif kind == "fsdp1":
            raise ValueError("state_dict: this model is sharded by FSDP1; pass its full state "
                             "dict (FSDP.state_dict_type(model, FULL_STATE_DICT)), as "
                             "DATALORATrainer does")
        else:
            tensors = full_tensors(own) if kind == "fsdp2" else own
        gathered_here = state_dict is None and kind == "fsdp2"
        if is_main_process and (not gathered_here or torch.distributed.get_rank() == 0):
            save_directory = Path(save_directory)
            config_json = self.config_datalora.to_json_string()
            # the config rides in the weights file too: a save interrupted between the two
            # writes leaves a pair load_adapter recognises as mismatched
            save_tensors(tensors, save_directory / WEIGHTS_NAME,
                         metadata={"format": "pt", "adapter_type": "datalora",
                                   "datalora_config": config_json, **self._base_identity(),
                                   **self._curriculum_metadata(),
                                   BASE_PARAMETERS_KEY: json.dumps(
                                       sorted(self._trained_base_names()))})
            atomic_write_text(save_directory / CONFIG_NAME, config_json)
        if gathered_here:
            torch.distributed.barrier()  # no rank returns before the files exist

    def load_adapter(self, path: str | Path) -> None:
        """Loads saved adapter tensors into this model (names and shapes must match, and the
        saved config's :data:`~datalora.adapter_files.FUNCTION_FIELDS` must equal this
        model's: a different ``lora_alpha``, top-k or pruned range would compute another
        function with the same tensors).

        Under FSDP2 call it on every rank: each rank keeps its shard of the saved tensors.
        """
        check_path(path)
        file = weights_file(Path(path))
        metadata = load_metadata(file)
        self._check_saved_config(Path(path), file, metadata)
        saved = without_wrapper_names(load_tensors(file), file)
        own = self.adapter_state_dict()
        base = {unwrapped_name(n): p for n, p in self.base_model.named_parameters()}
        # base parameters trained with the adapter (saved because they required grad)
        extra = {name for name in saved if name not in own and name in base}
        molora = self._molora_parameter_ids()
        check_declared_base_parameters(
            {name for name in saved if name in base and id(base[name]) not in molora},
            metadata, file)
        own.update({name: base[name] for name in extra})
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        replaced = [name for name in missing if name in self._saved_base_names]
        if replaced and not unexpected and len(replaced) == len(missing):
            raise ValueError(f"path: the adapter at {path} keeps the base's {replaced[:5]}, "
                             f"which an adapter loaded earlier replaced with the base weights "
                             f"it trained; they cannot be restored from this one: load it "
                             f"onto a fresh base model")
        if missing or unexpected:
            raise ValueError(f"adapter at {path} does not fit this model: missing {missing[:5]}"
                             f", unexpected {unexpected[:5]}")
        for name, tensor in saved.items():
            if own[name].shape != tensor.shape:  # a DTensor's shape is the full shape
                hint = (f": the adapter was saved with {tensor.shape[0]} token embeddings "
                        f"(resize_token_embeddings after wrapping); call "
                        f"resize_token_embeddings({tensor.shape[0]}) on the base first"
                        if name in extra and _is_embedding(self.base_model, own[name])
                        else "")
                raise ValueError(f"{name}: expected shape {tuple(own[name].shape)}, "
                                 f"saved shape {tuple(tensor.shape)}{hint}")
            if isinstance(own[name], nn.Parameter):  # buffers: keep_threshold is NaN unset
                check_saved_weight("path", name, tensor, file)
        cast = sorted({(str(saved[n].dtype), str(own[n].dtype)) for n in saved
                       if saved[n].dtype != own[n].dtype})
        if cast:
            pairs = ", ".join(f"{a} -> {b}" for a, b in cast)
            warnings.warn(f"path: adapter tensors are cast to this model's dtypes ({pairs}); "
                          f"a narrower dtype rounds them (the load is not bit-exact)",
                          stacklevel=2)
        if sharding_kind(self) == "fsdp1":
            raise ValueError("path: loading into an FSDP1-sharded model is not supported; "
                             "load the adapter before wrapping, or resume through "
                             "DATALORATrainer (FSDP checkpoint)")
        curriculum = self._saved_curriculum(metadata, file)  # checked before any copy
        copy_full_into(own, {name: saved[name] for name in own})
        self._saved_base_names |= extra
        if self.runtime is not None:  # the loaded keep_threshold's retention is not known
            self.runtime.threshold_calibrated_for(None)
        if curriculum is not None:
            self.set_curriculum_state(curriculum["tau"], curriculum["retention"],
                                      curriculum["hard"])

    def _curriculum_metadata(self) -> dict[str, str]:
        """The curriculum state (tau, retention, hard) for the weights file's metadata: with
        the tensors it decides what a shared-routing model computes."""
        state = self.curriculum_state()
        return {"curriculum_state": json.dumps(state)} if state else {}

    def _saved_curriculum(self, metadata: dict[str, str], file: Path) -> dict | None:
        """The curriculum state saved in the weights ``file``'s ``metadata`` (the inference
        state of the curriculum for adapters saved before the state was:
        ``temperature_final``, ``target_retention``, hard routing), checked as
        :meth:`set_curriculum_state` checks it; None without a saliency network."""
        if self.saliency is None:
            return None
        saved = metadata.get("curriculum_state")
        cfg = self.config_datalora
        if not saved:
            return {"tau": cfg.temperature_final, "retention": cfg.target_retention,
                    "hard": True}
        try:
            state = json.loads(saved)
            state = {key: state[key] for key in ("tau", "retention", "hard")}
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise ValueError(f"path: the curriculum state in {file} is not readable "
                             f"({type(exc).__name__}: {exc}); save the adapter again") from None
        try:
            check_number("tau", state["tau"], low=0, low_inclusive=False)
            check_number("retention", state["retention"], low=0, low_inclusive=False, high=1)
            if not isinstance(state["hard"], bool):
                raise ValueError(f"hard: expected True or False, got {state['hard']!r}")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"path: the curriculum state in {file} is invalid ({exc}); save "
                             f"the adapter again") from None
        return state

    def _base_identity(self) -> dict[str, str]:
        """``base_model_type`` / ``base_model_name_or_path`` of the base's HF config (those
        it has), saved with the adapter: a load onto another architecture warns."""
        config = getattr(self.base_model, "config", None)
        identity = {"base_model_type": getattr(config, "model_type", None),
                    "base_model_name_or_path": getattr(config, "_name_or_path", None)}
        return {key: value for key, value in identity.items() if isinstance(value, str) and value}

    def _check_saved_config(self, folder: Path, weights: Path,
                            metadata: dict[str, str]) -> None:
        """Raises ValueError when the config saved at ``folder`` (the copy in the ``weights``
        file's ``metadata``, or ``adapter_config.json`` for adapters saved before it carried
        one) differs from this model's in a :data:`~datalora.adapter_files.FUNCTION_FIELDS`
        field, or when the two saved copies disagree."""
        embedded = metadata.get("datalora_config")
        saved_type, here = metadata.get("base_model_type"), self._base_identity()
        if saved_type and here.get("base_model_type") not in (None, saved_type):
            trained_on = metadata.get("base_model_name_or_path") or saved_type
            warnings.warn(f"path: the adapter at {folder} was trained on a {saved_type!r} model "
                          f"({trained_on}) and this base is a {here['base_model_type']!r} one: "
                          f"its tensors fit by name and shape, but the function differs",
                          UserWarning, stacklevel=3)
        config_file = folder / CONFIG_NAME
        in_weights = None if embedded is None else config_from_json(embedded, weights)
        on_disk = (DATALORAConfig.from_pretrained(config_file) if config_file.exists()
                   else None)
        if in_weights is not None and on_disk is not None and any(
                a != b for _, a, b in function_fields(in_weights, on_disk, self.base_model)):
            raise ValueError(f"path: {config_file} does not match the config stored in "
                             f"{weights.name} (a save interrupted between the two files?); "
                             f"save the adapter again")
        saved = in_weights if in_weights is not None else on_disk
        if saved is None:
            return
        differs = [f"{name}: saved {a!r}, this model {b!r}"
                   for name, a, b in function_fields(saved, self.config_datalora,
                                                      self.base_model) if a != b]
        if differs:
            raise ValueError(f"path: the adapter at {folder} was trained with another config "
                             f"than this model's ({'; '.join(differs)}); build the model from "
                             f"the saved config (DATALORAModel.from_pretrained)")
        four_bit = any(layer._nf4_base for _, layer in self.molora_layers())
        if (saved.quantize == "nf4" and not four_bit) or (
                saved.quantize is None and self.config_datalora.quantize == "nf4"):
            trained, here = (("a 4-bit NF4", "a 16-bit") if saved.quantize == "nf4"
                             else ("a 16-bit", "a 4-bit NF4"))
            warnings.warn(f"path: the adapter at {folder} was trained on {trained} base and "
                          f"this model has {here} one: its outputs differ from the trained "
                          f"model's by the quantization error (fine when intended)",
                          UserWarning, stacklevel=3)

    def _adopt_saved_dtypes(self, dtypes: dict[str, torch.dtype | None]) -> None:
        """Gives the MoLoRA layers' parameters the floating dtypes they were saved in (an
        adapter trained in fp32 on a bf16 base keeps fp32 weights: the layers compute in
        the activations' dtype), so that loading them is exact."""
        own = self._molora_parameter_ids()
        for name, param in self._base_adapter_parameters():
            dtype = dtypes.get(name)
            if id(param) in own and dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path,
                        is_trainable: bool = False) -> DATALORAModel:
        """Rebuilds the adapter saved at ``path`` on ``model`` (bit-exact weights: the
        MoLoRA layers' parameters keep the dtypes they were saved in, e.g. fp32 adapters
        trained on a bf16 base). A failed load leaves ``model`` as it was.

        ``is_trainable``: False (default, as PEFT) freezes every parameter and sets eval
        mode, for inference; True leaves the adapter, the saliency network and the base
        parameters the adapter saved trainable, to train further (``DATALORATrainer``
        refuses a model with nothing to train)."""
        check_path(path)
        check_bool("is_trainable", is_trainable)  # "no" left the adapter trainable
        _check_base(model, DATALORAConfig())  # before reading the folder
        check_not_a_file(Path(path))  # not the weights file: its folder
        config = DATALORAConfig.from_pretrained(path)
        # what the adapter adapts is checked before anything is injected; what only the
        # injected model can check (every name, the saved config, the curriculum) is undone
        header = check_adapter_fits(model, Path(path), config)
        with _undone_on_failure(model) as built:
            # the layers start random and get the saved weights: the caller's RNG stream
            # (seed, load, sample) must not depend on the draws of that initialisation
            cuda = sorted({p.device.index or 0 for p in model.parameters()
                           if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=cuda):
                wrapped = cls(model, config)
            built.append(wrapped)
            wrapped._adopt_saved_dtypes({name: dtype for name, (_, dtype) in header.items()})
            wrapped.load_adapter(path)
        if is_trainable:
            for name in wrapped._saved_base_names:
                wrapped.base_model.get_parameter(name).requires_grad_(True)
        else:
            wrapped.requires_grad_(False)
            wrapped.eval()
        return wrapped



def _rows(module: object, size_attribute: str) -> int | None:
    """``module``'s ``size_attribute`` (``num_embeddings``, ``out_features``), else its
    weight's rows; None without either. The attribute first: a sharded weight's shape is
    a shard's."""
    size = getattr(module, size_attribute, None)
    if isinstance(size, int):
        return size
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _embedding_rows(model: nn.Module) -> int | None:
    """Rows of ``model``'s input embedding (None without ``get_input_embeddings``)."""
    try:
        return _rows(model.get_input_embeddings(), "num_embeddings")
    except (AttributeError, NotImplementedError):
        return None


def _check_given_tensors(tensors: dict[str, Any], own: dict[str, torch.Tensor],
                         keys: dict[str, str], shapes: bool) -> None:
    """The adapter tensors a ``state_dict`` passed to ``save_pretrained`` holds fit this
    model's (its shapes when ``shapes``: not those of a sharded model's flat shards or
    DeepSpeed's emptied partitions; a floating dtype where it has one) and its parameters
    are finite: a file that fails only at its load names nothing about the save."""
    for name, tensor in tensors.items():
        mine, key = own[name], keys[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict: {key!r} is a {type(tensor).__name__}, expected a "
                            f"tensor")
        if shapes and not hasattr(mine, "ds_shape") and tensor.shape != mine.shape:
            raise ValueError(f"state_dict: {key!r} has shape {tuple(tensor.shape)}, this "
                             f"model's {tuple(mine.shape)}")
        if mine.is_floating_point() and not tensor.is_floating_point():
            raise ValueError(f"state_dict: {key!r} is {tensor.dtype}, expected a float tensor")
        if isinstance(mine, nn.Parameter) and tensor.is_floating_point() \
                and not bool(torch.isfinite(tensor).all()):  # buffers: NaN = not calibrated
            raise ValueError(f"state_dict: {key!r} holds NaN or inf (a diverged run?)")


def _output_rows(model: nn.Module) -> int | None:
    """Classes of ``model``'s LM head (its output embedding's rows; None without one)."""
    return _rows(getattr(model, "get_output_embeddings", lambda: None)(), "out_features")


def out_of_vocabulary(model: nn.Module, input_ids: Any, labels: Any = None) -> str | None:
    """Why ``input_ids`` or ``labels`` (``[B, L]`` integer tensors, either may be None) do
    not fit ``model``'s vocabulary, or None: ids in ``[0, input embedding rows)``, labels
    in ``[0, LM head classes)`` or -100 (ignored). One host read."""
    checks = [("input_ids", input_ids, _embedding_rows(model), None),
              ("labels", labels, _output_rows(model), -100)]
    bounds = []
    for name, ids, size, ignored in checks:
        if not isinstance(ids, torch.Tensor) or size is None or ids.numel() == 0:
            continue
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            return f"{name}: expected integer token ids, got {ids.dtype}"
        kept = ids if ignored is None else ids.masked_fill(ids == ignored, 0)
        bounds.append((name, size, ignored, torch.stack(torch.aminmax(kept))))
    if not bounds:
        return None
    values = torch.stack([b[3].to("cpu", torch.int64) for b in bounds]).tolist()
    for (name, size, ignored, _), (low, high) in zip(bounds, values, strict=True):
        if low < 0 or high >= size:
            also = "" if ignored is None else f" or {ignored} (ignored)"
            return (f"{name}: expected ids in [0, {size}){also} (the model's vocabulary), "
                    f"got {low if low < 0 else high}")
    return None


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    """``model``'s input and output embedding weights (those it has)."""
    modules = [getattr(model, name, lambda: None)()
               for name in ("get_input_embeddings", "get_output_embeddings")]
    return [m.weight for m in modules if isinstance(getattr(m, "weight", None), torch.Tensor)]


def _is_embedding(model: nn.Module, param: torch.Tensor) -> bool:
    """Whether ``param`` is ``model``'s input or output embedding weight."""
    return any(weight is param for weight in _embedding_weights(model))


@contextmanager
def _undone_on_failure(model: nn.Module) -> Iterator[list[DATALORAModel]]:
    """Puts ``model`` back as it was when the block fails after MoLoRA layers were injected
    into it: its original modules, ``requires_grad`` flags and train / eval modes, and no
    pruning hooks of the wrappers the block appended to the yielded list."""
    modules = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    built: list[DATALORAModel] = []
    try:
        yield built
    except BaseException:
        for wrapped in built:
            if wrapped.runtime is not None:
                wrapped.runtime.remove()
        for name, module in list(model.named_modules()):
            if isinstance(module, MoLoRALinear) and name in modules:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, modules[name])
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        raise




def get_datalora_model(model: nn.Module, config: DATALORAConfig | None = None,
                       verbose: bool = True) -> DATALORAModel:
    """Injects MoLoRA into ``model``'s target modules and freezes the base. With the default
    ``routing='auto'`` a decoder LM gets the DATALORA method (a saliency network's shared
    routing and token pruning), any other module per-layer routers (see
    :class:`DATALORAModel`).

    Args:
        model: a Hugging Face causal LM (or any module with named ``nn.Linear`` children).
        config: the DATALORA configuration (defaults: ``DATALORAConfig()``).
        verbose: print the trainable-parameter report (and show a bar while the base is
            quantized).
    """
    verbose = check_flag("verbose", verbose)  # bool("no") is True
    wrapped = DATALORAModel(model, DATALORAConfig() if config is None else config,
                            progress=verbose)
    if verbose:
        wrapped.print_trainable_parameters()
    return wrapped
