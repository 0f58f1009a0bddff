"""Host reads in hot paths, counted on the CPU: each would be a GPU stream sync.

A dispatch mode sees every aten op (forward and backward) and counts, by the datalora frame
that caused them, scalar reads (``.item()`` / ``bool`` / ``float`` / ``int`` of a tensor)
and ops with a data-dependent output shape (``nonzero``, boolean-mask indexing, ``unique``,
``bincount``, ...); ``tolist`` / ``cpu`` are counted where the library calls them.
Budgets: a training forward + backward never reads the device (the saliency network's
routing is valid by construction: no value check); an eval forward with the calibrated
threshold twice (the threshold and the packed width), a generated token once (the
threshold) plus, in a cached step, the most tokens any row keeps; the same with
``DATALORA_CHECK_VALUES=0``.
"""

from __future__ import annotations

import collections
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from datalora import DATALORAConfig, get_datalora_model
from datalora.testing import build_tiny_model

aten = torch.ops.aten
PACKAGE = str(Path(__file__).resolve().parents[1] / "datalora")
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_dim.default, aten.bincount.default, aten.equal.default,
                  aten.is_nonzero.default, aten._local_scalar_dense.default}


TORCH = str(Path(torch.__file__).parent)


def _datalora_site() -> str | None:
    """``file:line`` of the code that caused the read when it is datalora's: the innermost
    frame outside torch and this file (None: another library's, e.g. transformers')."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(TORCH) or frame.filename == __file__:
            continue
        if frame.filename.startswith(PACKAGE):
            return f"{Path(frame.filename).name}:{frame.lineno}"
        return None
    return None


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def _record(self) -> None:
        site = _datalora_site()
        if site is not None:
            self.sites[site] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = (func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]))
        if func in DATA_DEPENDENT or boolean_index:
            self._record()
        return func(*args, **kwargs)


@pytest.fixture
def count_syncs(monkeypatch):
    """``with count_syncs() as counter:`` -> ``counter.sites`` ({datalora site: reads})."""
    import datalora.ops.eager as eager

    # the dispatch mode would make the ops take their custom-op (tracing) path
    monkeypatch.setattr(eager, "_get_current_dispatch_mode", lambda: None)
    # the torch backend's grouped strategy reads its routes per expert on the host: on the
    # CPU only; on a GPU it is always dense (test_ops_torch.py checks that)
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "dense")
    modes = []

    def read(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if modes:
                modes[-1]._record()
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("tolist", "cpu"):
        read(name)

    class Scope:
        def __enter__(self):
            modes.append(_Counter())
            modes[-1].__enter__()
            return modes[-1]

        def __exit__(self, *exc):
            modes[-1].__exit__(*exc)
            modes.pop()

    return Scope


def test_token_op_value_checks_read_the_device_once(count_syncs):
    # keep_idx's range, its distinct rows and a finite weight: one transfer
    from datalora import ops

    hidden, packed = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    keep, weight = torch.tensor([[0, 2, 5], [1, 3, 4]]), torch.rand(2, 3)
    with count_syncs() as counter:
        ops.scatter_tokens(hidden, packed, keep, weight)
        ops.gather_tokens(hidden, keep)
    assert sum(counter.sites.values()) == 2, counter.sites


def _model():
    torch.manual_seed(0)
    config = DATALORAConfig(num_lora_experts=4, lora_rank=4, num_active_experts=2,
                            routing="shared", prune_layers=[1, 4], target_retention=0.5)
    model = get_datalora_model(build_tiny_model(seed=0), config, verbose=False)
    with torch.no_grad():
        for head in (model.saliency.score_head, model.saliency.router_head):
            head.weight.normal_()
    return model


def _ids(length=12):
    return torch.randint(4, 1000, (2, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("check_values", ["1", "0"])
def test_training_step_never_reads_the_device(count_syncs, monkeypatch, check_values):
    monkeypatch.setenv("DATALORA_CHECK_VALUES", check_values)
    model = _model().train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    ids = _ids()
    with count_syncs() as counter:
        out = model(input_ids=ids, labels=ids)
        (out.loss + out.retention_loss + out.balance_loss).backward()
    assert model.runtime.last.mode == "packed"
    assert sum(counter.sites.values()) == 0, counter.sites


@pytest.mark.parametrize("check_values", ["1", "0"])
def test_eval_and_generation_read_the_device_a_constant_few_times(count_syncs, monkeypatch,
                                                                  check_values):
    monkeypatch.setenv("DATALORA_CHECK_VALUES", check_values)
    model = _model().eval()
    model.set_curriculum_state(retention=0.5)
    with torch.no_grad():
        model(input_ids=_ids())
        model.runtime.calibrate(model.runtime.last.saliency.token_scores)
        with count_syncs() as counter:
            model(input_ids=_ids())
        # the threshold and the packed width (documented)
        assert sum(counter.sites.values()) <= 2, counter.sites
        cache_model = _model().eval()
        cache_model.load_state_dict(model.state_dict())
        cache_model.set_curriculum_state(retention=0.5)
        with count_syncs() as counter:
            out = cache_model.generate(_ids(6), max_new_tokens=5, do_sample=False,
                                       pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == 11
    # per forward (prompt + 4 tokens): the threshold; the prompt's: its packed width (the
    # pruned layers run on its kept tokens); per cached step after the prompt: the most
    # tokens a row keeps (none: the pruned layers are skipped); once per call: generate()'s input
    # ids' range check (min and max in one read)
    assert sum(counter.sites.values()) <= 5 + 1 + 4 + 1, counter.sites


def test_a_chunk_on_a_filled_cache_reads_the_device_twice(count_syncs):
    # a prompt's second chunk: the threshold, then the most tokens any row keeps, which
    # both sizes the packed batch and tells whether the pruned layers may be skipped
    from transformers import DynamicCache

    from datalora.hf_compat import cache_kwargs

    model = _model().eval()
    model.set_curriculum_state(retention=0.5)
    ids = _ids(10)
    with torch.no_grad():
        model(input_ids=ids)
        model.runtime.calibrate(model.runtime.last.saliency.token_scores)
        cache = DynamicCache()
        model(input_ids=ids[:, :6], use_cache=True, **cache_kwargs(model, cache))
        with count_syncs() as counter:
            model(input_ids=ids[:, 6:], use_cache=True, **cache_kwargs(model, cache))
    assert model.runtime.last.mode == "packed"  # the pruned layers ran on the kept tokens
    assert sum(counter.sites.values()) == 2, counter.sites


def test_trainer_metrics_stay_on_the_device_between_logs(count_syncs, tmp_path):
    """``_accumulate`` runs every micro-batch: no host read there (``log`` reads once)."""
    from transformers import TrainingArguments

    from datalora import DATALORATrainer

    model = _model().train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             per_device_train_batch_size=2)
    trainer = DATALORATrainer(model=model, args=args, train_dataset=[{"input_ids": [1]}],
                              task_names=["a", "b"])
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    with count_syncs() as counter:
        for _ in range(3):
            trainer._accumulate(out.loss.detach(), out.retention_loss, out.balance_loss,
                                model.runtime.last, torch.tensor([0, 1]), 1)
    assert not counter.sites, counter.sites
    assert trainer._count == 3
    # the per-task loads equal a direct count of the valid routes of each sequence's task
    record = model.runtime.last
    ids_per_seq = record.routing.expert_ids.reshape(2, -1)
    valid = record.valid[:, :, None].expand(2, -1, 2).reshape(2, -1)
    loads = trainer._task_expert_load()
    for task in (0, 1):
        want = torch.bincount(ids_per_seq[task][valid[task]], minlength=4).float() * 3
        assert torch.equal(loads[task], want)
    # a task whose rows were all padding in this window is left out (as before)
    trainer._reset_metrics()
    record.valid[1] = False
    trainer._accumulate(out.loss.detach(), out.retention_loss, out.balance_loss, record,
                        torch.tensor([0, 1]), 1)
    assert set(trainer._task_expert_load()) == {0}


def test_per_task_routes_are_summed_instead_of_piling_up(tmp_path, monkeypatch):
    """Without logging, a pair of tensors per micro-batch piled up for a whole curriculum
    phase; every TASK_ROUTES_COMPACTED_AT micro-batches they are summed per task (one
    device read), to the same loads."""
    from transformers import TrainingArguments

    import datalora.trainer as trainer_module
    from datalora import DATALORATrainer

    model = _model().train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             per_device_train_batch_size=2)
    out = model(input_ids=_ids(), labels=_ids())

    def loads(compact_at):
        monkeypatch.setattr(trainer_module, "TASK_ROUTES_COMPACTED_AT", compact_at)
        trainer = DATALORATrainer(model=model, args=args, train_dataset=[{"input_ids": [1]}],
                                  task_names=["a", "b", "c"])
        for step in range(10):
            trainer._accumulate(out.loss.detach(), out.retention_loss, out.balance_loss,
                                model.runtime.last, torch.tensor([step % 3, 2]), 1)
        return len(trainer._task_routes), trainer._task_expert_load()

    (kept, compacted), (_, direct) = loads(4), loads(1000)
    assert kept < 4
    assert compacted.keys() == direct.keys() == {0, 1, 2}
    for task in direct:
        assert torch.equal(compacted[task], direct[task])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
