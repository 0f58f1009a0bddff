"""DATALORATrainer: loss falls, metrics logged over the 3 phases, checkpoint/resume exact,
DDP and FSDP2 on 2 CPU processes (slow)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, TrainingArguments

from datalora import DATALORAConfig, get_datalora_model
from datalora.curriculum import PHASES, CurriculumScheduler
from datalora.data import TASKS
from datalora.trainer import CURRICULUM_STATE_NAME, HISTORY_NAME, PENDING_NAME, DATALORATrainer

REPO = Path(__file__).resolve().parents[1]


def tiny_datalora(seed=0, **kw):
    cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, sliding_window=None, pad_token_id=0)
    torch.manual_seed(seed)
    base = MistralForCausalLM(cfg)
    config = DATALORAConfig(num_lora_experts=4, lora_rank=4, num_active_experts=2,
                            routing="shared", prune_layers=[1, 3], target_retention=0.5,
                            target_modules=["q_proj", "v_proj", "down_proj"],
                            lambda_prune=1.0, alpha_balance=0.01, **kw)
    return get_datalora_model(base, config, verbose=False)


class PatternData(torch.utils.data.Dataset):
    """Sequences from 4 'tasks', each a fixed cyclic pattern with a random phase."""

    def __init__(self, n=64, length=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            task = i % 4
            period = 3 + task
            base = 4 + 12 * task + torch.arange(period)
            start = int(torch.randint(period, (1,), generator=g))
            seq = base[(torch.arange(length) + start) % period]
            n_pad = int(torch.randint(0, 4, (1,), generator=g))
            mask = torch.ones(length, dtype=torch.long)
            if n_pad:
                seq[-n_pad:] = 0
                mask[-n_pad:] = 0
            self.rows.append({"input_ids": seq, "attention_mask": mask,
                              "labels": seq.masked_fill(mask == 0, -100),
                              "task_ids": torch.tensor(task)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_trainer(tmp_path, model, steps=24, save_steps=None, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=3e-2, logging_steps=2, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, remove_unused_columns=False, lr_scheduler_type="constant",
        dataloader_num_workers=0)
    return DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                           data_collator=collate, task_names=["a", "b", "c", "d"], **kw)


def test_the_readme_flow_logs_the_datasets_own_task_names(tmp_path):
    """The README's trainer snippet (rows with their own ``task``, the collator's default
    tasks): the per-task expert load is logged under those names; it was all under "-1"
    (the default lists the embedded tasks only)."""
    from datalora.data import CausalLMCollator

    rows = [{"input_ids": list(range(4 + i % 3, 14)), "labels": list(range(4 + i % 3, 14)),
             "task": "math" if i % 2 else "greet"} for i in range(16)]
    rows[0]["task"] = "arithmetic"  # an embedded name keeps its id
    collator = CausalLMCollator(pad_token_id=0, return_task_ids=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1,
                             per_device_train_batch_size=16, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no",
                             remove_unused_columns=False)
    trainer = DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=rows,
                              data_collator=collator, calibrate_batches=0)
    assert collator.tasks == (*TASKS, "greet", "math") and trainer.task_names[-2:] == [
        "greet", "math"]
    trainer.train()
    loads = [h["task_expert_load"] for h in trainer.datalora_history if "task_expert_load" in h]
    assert loads and all(set(load) == {"arithmetic", "greet", "math"} for load in loads)
    with pytest.warns(UserWarning, match="task 'poetry' is not in tasks"):
        assert collator([{"input_ids": [5], "task": "poetry"}])["task_ids"].tolist() == [-1]


def test_short_run_lowers_loss_and_logs_three_phases(tmp_path):
    model = tiny_datalora()
    trainer = make_trainer(tmp_path, model, steps=12)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6
    assert logs[-1]["lm_loss"] < 0.93 * logs[0]["lm_loss"], [h["lm_loss"] for h in logs]
    for key in ("phase", "tau", "retention", "retention_target", "retention_loss",
                "balance_loss", "rank_scale_mean", "expert_load_e0", "expert_load_e3"):
        assert key in logs[-1], key
    assert [h["phase"] for h in logs] == [0, 0, 1, 1, 2, 2]
    assert logs[0]["retention"] == 1.0 and logs[0]["tau"] == 5.0
    assert logs[-1]["tau"] == 0.5 and logs[-1]["retention_target"] == 0.5
    assert abs(logs[-1]["retention"] - 0.5) < 0.08  # ceil(0.5 n) of n real tokens
    assert 0.9 < sum(logs[-1][f"expert_load_e{i}"] for i in range(4)) < 1.1
    hist = trainer.datalora_history
    assert set(hist[-1]["task_expert_load"]) == {"a", "b", "c", "d"}
    assert model.curriculum_state() == {"tau": 0.5, "retention": 0.5, "hard": True}
    thr = float(model.saliency.keep_threshold)
    assert thr == thr  # calibrated after training


def same(a, b):
    """Bit-exact equality (NaN == NaN: an uncalibrated threshold)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        (a.view(-1).view(torch.int32) == b.view(-1).view(torch.int32)).all()
        if a.dtype == torch.float32 else torch.equal(a, b))


def adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_checkpoint_resume_is_bit_exact(tmp_path):
    full = make_trainer(tmp_path / "full", tiny_datalora(), steps=6, calibrate_batches=0)
    full.train()
    run = make_trainer(tmp_path / "run", tiny_datalora(), steps=6, save_steps=3,
                       calibrate_batches=0)
    run.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert (ckpt / "adapter_config.json").exists()
    saved_curriculum = json.loads((ckpt / CURRICULUM_STATE_NAME).read_text())
    assert saved_curriculum["step_count"] == 3 and saved_curriculum["total_steps"] == 6
    a_full, a_run = adapter(full.datalora_model), adapter(run.datalora_model)
    for k in a_full:
        assert same(a_full[k], a_run[k]), k  # saving does not perturb training
    # resume from step 3 (mid-sparsification) on a fresh model: same final weights and
    # schedule, bit for bit
    assert run.curriculum.state_at(3).phase == "sparsification"
    resumed_model = tiny_datalora()  # same frozen base, adapter re-initialised: the
    with torch.no_grad():             # trained tensors must all come from the checkpoint
        for v in resumed_model.adapter_state_dict().values():
            v.normal_()
    resumed = make_trainer(tmp_path / "run", resumed_model, steps=6, calibrate_batches=0)
    loaded = {}
    orig_load = resumed._load_from_checkpoint

    def spy(path, model=None):
        orig_load(path, model)
        loaded.update(adapter(resumed.datalora_model))
    resumed._load_from_checkpoint = spy
    with warnings.catch_warnings():  # the same schedule: no "continuing the checkpoint's"
        warnings.filterwarnings("error", message="resume_from_checkpoint: continuing")
        resumed.train(resume_from_checkpoint=str(ckpt))
    from datalora.io import load_tensors
    on_disk = load_tensors(ckpt / "adapter_model.safetensors")
    for k, v in on_disk.items():
        assert same(loaded[k], v), k
    a_res = adapter(resumed_model)
    for k in a_full:
        assert same(a_full[k], a_res[k]), k
    assert resumed.curriculum.state_dict() == full.curriculum.state_dict()
    assert resumed_model.curriculum_state() == full.datalora_model.curriculum_state()
    # the history of the steps before the checkpoint comes back with it (logging_steps=2,
    # checkpoint at 3: the record of step 2 is saved, the steps after it are logged anew)
    saved_history = json.loads((ckpt / HISTORY_NAME).read_text())
    assert [h["step"] for h in saved_history] == [2]
    assert saved_history == json.loads(json.dumps(full.datalora_history[:1]))
    assert ([(h["step"], h["phase"]) for h in resumed.datalora_history]
            == [(h["step"], h["phase"]) for h in full.datalora_history] == [
                (2, "warmup"), (4, "sparsification"), (6, "hardening")])
    assert resumed.datalora_history[-1]["lm_loss"] == full.datalora_history[-1]["lm_loss"]
    # and so do the metrics of the steps between the last log and the checkpoint (step 3):
    # every record but the Trainer's own "loss" (which restarts at a resume) is the same
    def records(trainer):
        return [{k: v for k, v in h.items() if k != "loss"} for h in trainer.datalora_history]
    assert records(resumed) == records(full)


def test_resume_at_a_phase_boundary_records_the_pending_steps_under_their_phase(tmp_path):
    """A checkpoint at the last warmup step, its steps not logged yet (logging_steps=3): the
    resumed run records them under warmup as the uninterrupted run does, not averaged into
    the first sparsification log."""
    def trainer(folder, model, **kw):
        t = make_trainer(folder, model, steps=6, calibrate_batches=0, **kw)
        t.args.logging_steps = 3
        return t

    full = trainer(tmp_path / "full", tiny_datalora())
    full.train()
    assert [(h["step"], h["phase"], h["loss"] is None) for h in full.datalora_history][:2] \
        == [(2, "warmup", True), (3, "sparsification", False)]
    trainer(tmp_path / "run", tiny_datalora(), save_steps=2).train()
    resumed = trainer(tmp_path / "run", tiny_datalora())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))

    def records(t):
        return [{k: v for k, v in h.items() if k != "loss"} for h in t.datalora_history]
    assert records(resumed) == records(full)


def test_history_records_never_mix_steps_of_two_phases(tmp_path):
    """logging_steps=3 over 6 steps (phases: steps 1-2, 3-4, 5-6): the steps of a phase that
    ends between two logs are recorded under that phase, not averaged into the next log
    under the new phase's name (the per-phase summary of train_datalora reads them)."""
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
        learning_rate=3e-2, logging_steps=3, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=PatternData(),
                              data_collator=collate, calibrate_batches=0)
    trainer.train()
    hist = trainer.datalora_history
    assert [(h["step"], h["phase"]) for h in hist] == [
        (2, "warmup"), (3, "sparsification"), (4, "sparsification"), (6, "hardening")]
    assert [h["loss"] is None for h in hist] == [True, False, True, False]
    assert hist[0]["retention"] == 1.0 and hist[-1]["retention_target"] == 0.5
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == [1, 2]


def test_training_ends_in_the_trainers_curriculum_end_state(tmp_path):
    """A trainer given its own datalora_config or curriculum anneals to their target: the
    model is left there (tau, retention) and the keep threshold calibrated for it, not at
    the model config's target_retention / temperature_final."""
    import dataclasses

    from datalora.curriculum import CurriculumScheduler

    model = tiny_datalora()
    cfg = dataclasses.replace(model.datalora_config, target_retention=0.25,
                              temperature_final=0.2)
    make_trainer(tmp_path / "a", model, steps=3, datalora_config=cfg).train()
    assert model.curriculum_state() == {"tau": 0.2, "retention": 0.25, "hard": True}
    assert model.runtime.calibrated_retention == 0.25
    assert model.runtime.target_retention == 0.25  # the compiled packed width's grid
    model = tiny_datalora()
    make_trainer(tmp_path / "b", model, steps=3,
                 curriculum=CurriculumScheduler(5.0, 1.0, 0.3)).train()
    assert model.curriculum_state() == {"tau": 1.0, "retention": 0.3, "hard": True}
    assert model.runtime.calibrated_retention == 0.3
    assert model.runtime.target_retention == 0.3  # the scheduler's, not the config's 0.5


def test_a_trainer_built_from_model_init_trains_again_after_releasing_its_model(tmp_path):
    """Trainer.hyperparameter_search sets trainer.model = None after each trial and the next
    train() rebuilds it from model_init: the trainable-parameter check failed on None
    ("'NoneType' object has no attribute 'parameters'") from the second trial."""
    trainer = make_trainer(tmp_path, None, steps=2, calibrate_batches=0,
                           model_init=lambda trial=None: tiny_datalora())
    trainer.train()
    first = trainer.model
    trainer.model = None  # what the search's objective does after a trial
    trainer.train()
    assert trainer.model is not None and trainer.model is not first
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("stop_at, warns", [(3, True), (22, False)])
def test_a_run_stopped_before_hardening_warns_about_the_final_state(tmp_path, stop_at,
                                                                     warns):
    """An early-stopping callback ended a 24-step run in sparsification; train() then set
    the final hard, pruned state silently (eval loss 0.33 nats worse right after)."""
    import warnings

    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= stop_at:
                control.should_training_stop = True

    trainer = make_trainer(tmp_path, tiny_datalora(), steps=24, calibrate_batches=0,
                           callbacks=[Stop()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == stop_at
    assert any("never trained in" in str(w.message) for w in caught) == warns


def test_resume_true_restores_the_last_checkpoints_curriculum(tmp_path):
    """``resume_from_checkpoint=True`` (the last checkpoint in output_dir): the curriculum
    state is read by ``train`` itself, whatever path loads the weights."""
    import shutil

    run = make_trainer(tmp_path, tiny_datalora(), steps=6, save_steps=3, calibrate_batches=0)
    run.train()
    shutil.rmtree(tmp_path / "checkpoint-6")  # the last one left: checkpoint-3
    # another mode: only the saved state can make the resumed schedule equal the run's
    resumed = make_trainer(tmp_path, tiny_datalora(), steps=6, calibrate_batches=0,
                           curriculum_mode="epochs")
    resumed._load_from_checkpoint = lambda path, model=None: None  # weights: not this test
    assert resumed._curriculum_state_at(True)["step_count"] == 3
    assert resumed._curriculum_state_at(False) is None
    with pytest.warns(UserWarning, match="continuing the checkpoint's curriculum, not this "
                                         "run's .*mode: checkpoint 'steps', this run 'epochs'"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.curriculum.state_dict() == run.curriculum.state_dict()


def test_resume_true_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    """Hugging Face's get_last_checkpoint picks the newest checkpoint-N folder, complete or
    not: a run killed while saving checkpoint-6 (no trainer_state.json yet) failed to resume
    with a FileNotFoundError after loading the model; the command line's 'last' skipped
    it."""
    run = make_trainer(tmp_path, tiny_datalora(), steps=6, save_steps=3, calibrate_batches=0)
    run.train()
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()
    resumed = make_trainer(tmp_path, tiny_datalora(), steps=6, calibrate_batches=0)
    with pytest.warns(UserWarning, match="skipping checkpoint-6 .*resuming checkpoint-3"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert resumed.curriculum.state_dict() == run.curriculum.state_dict()
    empty = make_trainer(tmp_path / "none", tiny_datalora(), steps=2, calibrate_batches=0)
    with pytest.raises(ValueError, match="resume_from_checkpoint: found no complete "
                                         "checkpoint-N folder"):
        empty.train(resume_from_checkpoint=True)


def test_resuming_with_more_steps_trains_the_first_resumed_step_at_the_new_schedules_rate(
        tmp_path):
    """Hugging Face rebuilds the learning-rate schedule for the new max_steps but restored
    the optimizer's last rate: a run resumed from the end of a 2-step cosine trained its
    third step at rate 0."""
    import math

    from transformers import TrainingArguments

    def trainer(steps):
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
            learning_rate=3e-2, logging_steps=1, save_strategy="steps", save_steps=2,
            report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
            remove_unused_columns=False, lr_scheduler_type="cosine", dataloader_num_workers=0)
        return DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=PatternData(),
                               data_collator=collate, calibrate_batches=0)

    trainer(2).train()
    resumed = trainer(4)
    with pytest.warns(UserWarning, match="continuing the checkpoint's curriculum"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    rates = {h["step"]: h["learning_rate"] for h in resumed.state.log_history
             if "learning_rate" in h}
    cosine = [3e-2 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert rates[3] == pytest.approx(cosine[2]) and rates[4] == pytest.approx(cosine[3])


def test_aux_loss_follows_the_trainers_gradient_accumulation_scaling(tmp_path):
    """The aux losses are divided by the accumulation steps exactly when the Trainer will
    not divide the returned loss itself (its rule; ``loss_is_scaled_for_ga`` only exists
    in newer transformers releases, so it must not be required)."""
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=1)
    cases = [(True, 8, None, True), (True, None, None, False), (False, 8, None, False),
             (False, None, lambda *a, **k: 0.0, True)]
    for accepts, items, loss_func, want in cases:
        trainer.model_accepts_loss_kwargs, trainer.compute_loss_func = accepts, loss_func
        assert trainer._loss_scaled_for_ga(items) is want
    trainer.loss_is_scaled_for_ga = False  # the explicit override wins where it exists
    assert trainer._loss_scaled_for_ga(8) is False


def test_trainer_rejects_per_layer_routing(tmp_path):
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = get_datalora_model(MistralForCausalLM(cfg), DATALORAConfig(
        num_lora_experts=2, lora_rank=2, num_active_experts=1, routing="per_layer"),
        verbose=False)
    with pytest.raises(ValueError, match="routing"):
        make_trainer(tmp_path, model)


# Ends every multi-process script once all its checks have passed. The modules (FSDP2's
# DeviceMesh, DDP's reducer) keep the gloo process group alive past destroy_process_group;
# when interpreter finalization destroys it, its worker threads can still be joinable and
# std::terminate aborts the rank (seen once in CI, after both ranks had printed their OK).
CLEAN_EXIT = r'''
import os as _os, sys as _sys, torch.distributed as _dist
_dist.barrier()  # no rank closes its connections while the other still uses them
_dist.destroy_process_group()
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
'''


DDP_SCRIPT = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_trainer import make_trainer, tiny_datalora, adapter
from pathlib import Path
model = tiny_datalora()
trainer = make_trainer(Path(sys.argv[1]), model, steps=6)
trainer.train()
flat = torch.cat([v.flatten() for v in adapter(model).values()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
assert dist.get_world_size() == 2
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
assert len([h for h in trainer.state.log_history if "loss" in h]) >= 1 or dist.get_rank() != 0
# the DATALORA metrics are the ranks' mean (they were each rank's own: expert loads of
# 0.35 and 0.11 at one step), the keep threshold one calibration on all ranks' tokens
records = [None, None]
dist.all_gather_object(records, (trainer.datalora_history, float(model.saliency.keep_threshold)))
assert records[0] == records[1], "ranks logged different metrics or thresholds"
assert trainer.datalora_history and trainer.datalora_history[0]["task_expert_load"]
from datalora.trainer import _gather_varying
mine = torch.arange(3 + 4 * dist.get_rank(), dtype=torch.float32) + 10 * dist.get_rank()
assert _gather_varying(mine, 2).tolist() == [0, 1, 2, *range(10, 17)]
print("DDP-OK", dist.get_rank(), float(model.saliency.keep_threshold))
''' + CLEAN_EXIT


def run_torchrun(tmp_path, source: str, port: int, processes: int = 2,
                 extra_args: list[str] = ()) -> str:
    """Runs ``source`` in ``processes`` processes with ``torchrun`` (argv: out dir, tests
    dir, ``extra_args``); returns stdout, failing the test on a non-zero exit."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
         "--master_port", str(port), str(script), str(tmp_path / "out"), str(REPO / "tests"),
         *extra_args],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    assert run_torchrun(tmp_path, DDP_SCRIPT, 29533).count("DDP-OK") == 2


def test_save_takes_the_adapter_from_the_gathered_state_dict(tmp_path):
    """Under FSDP / DeepSpeed ZeRO-3 the Trainer passes the full state dict it gathered to
    ``_save`` (the live parameters are shards): the adapter must come from it."""
    from datalora.io import load_tensors

    model = tiny_datalora()
    trainer = make_trainer(tmp_path, model, steps=1)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in gathered:
        if ".lora_" in k or (k.startswith("saliency.") and gathered[k].is_floating_point()):
            gathered[k] += 1.0
    threshold = "saliency.keep_threshold"
    del gathered[threshold]  # a buffer the gathered dict lacks comes from the model
    trainer._save(str(tmp_path / "out"), state_dict=gathered)
    saved = load_tensors(tmp_path / "out" / "adapter_model.safetensors")
    live = adapter(model)
    assert set(saved) == set(live)
    for name, tensor in saved.items():
        if name == threshold:
            assert same(tensor, live[name])
        else:
            key = name if name.startswith("saliency.") else f"base_model.{name}"
            assert same(tensor, gathered[key]) and not same(tensor, live[name]), name
    lora = next(k for k in gathered if ".lora_A" in k)
    del gathered[lora]
    with pytest.raises(ValueError, match="state_dict: lacks adapter tensors"):
        model.save_pretrained(tmp_path / "bad", state_dict=gathered)
    # tensors that would fail only at the load (or deep inside the save) are named here
    gathered[lora] = model.state_dict()[lora]
    key = next(k for k in gathered if ".lora_B" in k)
    good = gathered[key]
    for value, error, match in ((good[:1], ValueError, "has shape"),
                                (torch.full_like(good, float("nan")), ValueError,
                                 "holds NaN or inf"),
                                (good.long(), ValueError, "is torch.int64"),
                                (good.tolist(), TypeError, "is a list")):
        with pytest.raises(error, match=rf"^state_dict: '{re.escape(key)}' {match}"):
            model.save_pretrained(tmp_path / "bad", state_dict={**gathered, key: value})
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()
    model.save_pretrained(tmp_path / "bad", state_dict=gathered)


FSDP_SCRIPT = r'''
import sys, torch, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from test_trainer import tiny_datalora, adapter, same, PatternData, collate
from datalora.io import load_tensors
from datalora.sharding import full_tensors, sharding_kind

dist.init_process_group("gloo")
rank, mesh = dist.get_rank(), init_device_mesh("cpu", (dist.get_world_size(),))
out = Path(sys.argv[1])

def mixed(model):  # as train_datalora(bf16=True): bf16 frozen base, fp32 adapter and USN
    model.base_model.to(torch.bfloat16)
    for _, layer in model.molora_layers():
        layer.float()
        layer.base_layer.to(torch.bfloat16)
    return model

def shard(model):
    for layer in model.base_model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)

def train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate([PatternData()[i] for i in range(8)])  # the same batch on every rank
    model.train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    for step in range(steps):
        torch.manual_seed(100 + step)  # same Gumbel noise in both runs
        out_ = model(**batch)
        (out_.loss + out_.retention_loss + 0.01 * out_.balance_loss).backward()
        opt.step()
        opt.zero_grad()

reference = mixed(tiny_datalora())  # unsharded, trained on the same batch
train(reference)
model = shard(mixed(tiny_datalora()))  # FSDP2 groups mixing bf16 and fp32 parameters
assert sharding_kind(model) == "fsdp2" and sharding_kind(reference) is None
train(model)
model.save_pretrained(out)  # every rank gathers; rank 0 writes; all return after the write
saved = load_tensors(out / "adapter_model.safetensors")
want = adapter(reference)
assert set(saved) == set(want)
for name in want:  # FSDP2 training == single-process training on the same batch
    assert same(saved[name], want[name]), name  # bit-exact

fresh = shard(mixed(tiny_datalora(seed=1)))
fresh.load_adapter(out)  # every rank keeps its shard of the saved tensors
loaded = full_tensors(fresh.adapter_state_dict())
for name in saved:
    assert same(loaded[name], saved[name]), name
print("FSDP-OK", rank)
''' + CLEAN_EXIT


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_train_save_and_load(tmp_path):
    assert run_torchrun(tmp_path, FSDP_SCRIPT, 29534).count("FSDP-OK") == 2


TRAINER_FSDP_SCRIPT = r'''
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from transformers import TrainingArguments
from test_trainer import tiny_datalora, same, PatternData, collate
from datalora import DATALORATrainer
from datalora.io import load_tensors
from datalora.sharding import sharding_kind

out, version = Path(sys.argv[1]), int(sys.argv[3])

def trainer(folder, model):
    args = TrainingArguments(
        output_dir=str(folder), max_steps=4, per_device_train_batch_size=8,
        learning_rate=3e-2, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to=[], seed=0, data_seed=0, disable_tqdm=True, remove_unused_columns=False,
        lr_scheduler_type="constant", dataloader_num_workers=0, fsdp="full_shard",
        fsdp_config={"version": version,
                     "transformer_layer_cls_to_wrap": ["MistralDecoderLayer"]})
    return DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                           data_collator=collate, task_names=["a", "b", "c", "d"],
                           calibrate_batches=0)

def gathered_adapter(tr):  # the full adapter, gathered by FSDP itself
    full_sd = tr.accelerator.get_state_dict(tr.model)
    return {name: full_sd[key].cpu() for name, key in tr.datalora_model._adapter_keys().items()}

full = trainer(out / "full", tiny_datalora())
full.train()
assert full.is_fsdp_enabled and sharding_kind(full.datalora_model) == f"fsdp{version}"
final = gathered_adapter(full)
full.save_model(str(out / "final"))  # the Trainer gathers the state dict, _save selects
saved = load_tensors(out / "final" / "adapter_model.safetensors")
assert set(saved) == set(final)
for name in final:
    assert same(saved[name], final[name]), name
ckpt = out / "full" / "checkpoint-2"
assert (ckpt / "adapter_model.safetensors").exists()
fresh = tiny_datalora()  # same frozen base; every adapter tensor must come from the checkpoint
with torch.no_grad():
    for v in fresh.adapter_state_dict().values():
        v.normal_()
resumed = trainer(out / "resumed", fresh)
resumed.train(resume_from_checkpoint=str(ckpt))  # the Trainer's FSDP checkpoint
assert resumed.curriculum.state_dict() == full.curriculum.state_dict()
again = gathered_adapter(resumed)
for name in final:
    assert torch.allclose(again[name], final[name], rtol=1e-4, atol=1e-5, equal_nan=True), name
print("TRAINER-FSDP-OK")
'''


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2])
def test_trainer_under_fsdp_saves_the_gathered_adapter_and_resumes(tmp_path, version):
    """accelerate turns FSDP on for GPUs only: one GPU process under torchrun."""
    stdout = run_torchrun(tmp_path, TRAINER_FSDP_SCRIPT, 29535 + version, processes=1,
                          extra_args=[str(version)])
    assert "TRAINER-FSDP-OK" in stdout


def test_a_base_to_quantize_moves_to_the_gpu_when_it_fits(monkeypatch):
    """The CLI loads a base on the CPU; NF4-quantizing a 7B one there took minutes before
    the Trainer moved it to the GPU."""
    from datalora import testing

    model = testing.build_tiny_model(seed=0)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    moved = []
    monkeypatch.setattr(model, "to", lambda device: moved.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * size, 4 * size))

    def move():
        return testing.to_gpu_if_it_fits(model, testing.QUANTIZE_GPU_HEADROOM,
                                         "to be quantized there",
                                         "its layers are quantized on the CPU")
    assert move() and moved == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (size, 4 * size))
    with pytest.warns(UserWarning, match=r"model: the base needs about .* GiB on cuda:1 "
                                         r"to be quantized there .*quantized on the CPU"):
        assert not move()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not move() and len(moved) == 1


@pytest.mark.gpu
def test_train_quantizes_a_cpu_loaded_base_on_the_gpu(tmp_path):
    from datalora.nf4_linear import NF4Linear
    from datalora.train import train_datalora

    result = train_datalora(DATALORAConfig(quantize="nf4"), output_dir=tmp_path / "out",
                            max_steps=1, batch_size=2, limit=4, progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, NF4Linear)]
    assert layers and all(m.weight_data.is_cuda for m in layers)


def test_train_cli_with_config_file_saves_a_reloadable_adapter(tmp_path, capsys):
    from datalora.cli import main
    from datalora.model import DATALORAModel
    from datalora.testing import build_tiny_model

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "num_lora_experts: 4\nlora_rank: 4\nnum_active_experts: 2\nprune_layers: [1, 4]\n"
        "target_modules: [q_proj, v_proj]\n"
        "training:\n  max_steps: 3\n  limit: 12\n  batch_size: 4\n  max_length: 48\n"
        "  curriculum_mode: steps\n  logging_steps: 1\n  bf16: true\n"
        "  eval_dataset: embedded\n  eval_limit: 8\n"
        "  trainer_args: {weight_decay: 0.05, max_grad_norm: 0.5}\n")
    out = tmp_path / "adapter"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for phase in ("warmup", "sparsification", "hardening", "eval_loss_pruned",
                  "eval_loss_dense"):
        assert phase in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["routing"] == "shared" and config["num_lora_experts"] == 4
    assert (out / "curriculum_state.json").exists()
    args = torch.load(out / "training_args.bin", weights_only=False)  # trainer_args reached
    assert (args.weight_decay, args.max_grad_norm, args.max_steps) == (0.05, 0.5, 3)
    model = DATALORAModel.from_pretrained(build_tiny_model(), out)
    assert float(model.saliency.keep_threshold) == float(model.saliency.keep_threshold)
    ids = torch.randint(4, 500, (2, 12))
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert torch.equal(a, b) and model.runtime.last.mode == "packed"


def test_train_config_validation(tmp_path):
    from datalora.train import load_train_config, train_datalora

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": {"epochz": 3}}))
    with pytest.raises(ValueError, match="epochz"):
        load_train_config(bad)
    with pytest.raises(ValueError, match="routing"):
        train_datalora(DATALORAConfig(routing="per_layer"), max_steps=1)
    with pytest.raises(ValueError, match="max_steps"):
        train_datalora(None, max_steps=0)
    for kwargs in ({"learning_rate": "1e-4"}, {"gradient_accumulation_steps": 0},
                   {"batch_size": 0}, {"save_steps": 0}, {"save_steps": -1},
                   {"save_steps": "2"}, {"epochs": "x"}, {"epochs": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            train_datalora(None, max_steps=1, **kwargs)
    with pytest.raises(ValueError, match=r"\['weight_decy'\] are not TrainingArguments"):
        train_datalora(None, max_steps=1, limit=8, trainer_args={"weight_decy": 0.1},
                       progress=False, output_dir=str(tmp_path / "bad_args"))
    # refused before, though the trainer keeps the task columns: per-task loads still logged
    result = train_datalora(None, max_steps=1, limit=8, progress=False,
                            trainer_args={"remove_unused_columns": True},
                            output_dir=str(tmp_path / "unused_columns"))
    assert result.datalora_history[-1]["task_expert_load"]


@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_evaluate_loss_refuses_a_bad_batch_size(batch_size):
    """batch_size=-2 evaluated no row and returned a loss of 0.0; 0 failed inside range()."""
    from datalora.train import evaluate_loss

    with pytest.raises(ValueError, match=r"^batch_size: expected an int >= 1"):
        evaluate_loss(tiny_datalora(), [{"question": "q", "response": "r"}], None,
                      batch_size=batch_size)


def test_epochs_mode_with_max_steps_reaches_hardening(tmp_path):
    """With max_steps the Trainer ignores num_train_epochs (3 by default): the epochs
    schedule takes its epochs from max_steps (16 steps of 8 per epoch = 2 epochs)."""
    from transformers import TrainerCallback

    trainer = make_trainer(tmp_path, tiny_datalora(), steps=16, curriculum_mode="epochs",
                           calibrate_batches=0)
    phases = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            phases.append(trainer._applied.phase)
    trainer.add_callback(Spy())
    trainer.train()
    assert phases[-1] == "hardening" and phases[0] == "warmup"


def _eval_trainer(tmp_path, model, steps, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=3e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, remove_unused_columns=False, lr_scheduler_type="constant",
        dataloader_num_workers=0, **{"save_strategy": "no", **kw})
    return DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                           eval_dataset=PatternData(n=16, seed=1), data_collator=collate,
                           calibrate_batches=0)


def test_evaluate_reports_eval_loss_and_load_best_model_works(tmp_path):
    """DATALORAModel.forward(*args, **kwargs) names no `labels`, so the Trainer found no
    label names and computed no eval loss (load_best_model_at_end raised a KeyError)."""
    trainer = _eval_trainer(tmp_path, tiny_datalora(), 4, eval_strategy="steps",
                            eval_steps=2, save_strategy="steps", save_steps=2,
                            load_best_model_at_end=True, save_total_limit=1)
    assert "eval_loss" in trainer.evaluate()
    trainer.train()
    assert trainer.state.best_model_checkpoint is not None


def test_label_smoothing_uses_next_token_labels(tmp_path):
    """The Trainer shifts labels for label smoothing only for causal-LM class names it knows;
    a tiny smoothing factor must give the model's own (shifted) loss."""
    model = tiny_datalora()
    batch = collate([PatternData()[i] for i in range(8)])
    batch.pop("task_ids")
    trainer = _eval_trainer(tmp_path, model, 1, label_smoothing_factor=1e-6)
    model.eval()
    with torch.no_grad():
        smoothed = trainer.compute_loss(model, dict(batch))
        plain = model(**batch).loss
    assert abs(float(smoothed) - float(plain)) < 1e-3


def test_each_train_call_is_a_run_of_its_own_and_the_last_steps_are_recorded(tmp_path):
    """A second train() builds its own curriculum (not the first run's), starts a fresh
    history and metric sums; steps after the last log are recorded at the end."""
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=5, calibrate_batches=0)
    trainer.train()
    hist = trainer.datalora_history
    assert [h["step"] for h in hist] == [2, 4, 5] and hist[-1]["loss"] is None
    assert hist[-1]["phase"] == "hardening" and hist[0]["loss"] is not None
    trainer.args.max_steps, trainer.args.logging_steps = 12, 1
    trainer.train()
    assert trainer.curriculum.total_steps == 12
    assert [h["step"] for h in trainer.datalora_history] == list(range(1, 13))
    want = [trainer.curriculum.state_at(s - 1).phase for s in range(1, 13)]
    assert [h["phase"] for h in trainer.datalora_history] == want
    assert want.count("warmup") == want.count("hardening") == 4


def test_trainer_helpful_defaults_and_errors(tmp_path):
    from datalora.curriculum import CurriculumScheduler

    # calibrate_batches=0 skips the end-of-training calibration, not an explicit call
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=2, calibrate_batches=0)
    trainer.train()
    assert trainer.calibrate_keep_threshold() == trainer.calibrate_keep_threshold()
    assert float(trainer.datalora_model.saliency.keep_threshold) == \
        float(trainer.datalora_model.saliency.keep_threshold)  # not NaN
    # a user's epochs curriculum gets num_epochs from the run
    cfg = trainer.datalora_config
    curriculum = CurriculumScheduler(cfg.temperature_init, cfg.temperature_final,
                                     cfg.target_retention, cfg.curriculum_split, mode="epochs")
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=2, calibrate_batches=0,
                           curriculum=curriculum)
    trainer.train()
    assert curriculum.num_epochs == 2 / 8  # the epochs max_steps=2 reaches (8 batches each)
    assert trainer.datalora_history[-1]["phase"] == "sparsification"  # not still warmup
    # batches without labels: an error that says what is missing
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=2, calibrate_batches=0)
    trainer.data_collator = lambda rows: {k: v for k, v in collate(rows).items()
                                          if k != "labels"}
    with pytest.raises(ValueError, match="needs 'labels' in every training batch"):
        trainer.train()
    for bad in (-1, 1.5, "4"):  # -1 skipped the calibration without a word
        with pytest.raises(ValueError, match=r"^calibrate_batches: expected an int >= 0"):
            make_trainer(tmp_path, tiny_datalora(), steps=2, calibrate_batches=bad)
    # a dict was taken and failed at train() with AttributeError inside the curriculum
    with pytest.raises(TypeError, match=r"^datalora_config: expected a DATALORAConfig"):
        make_trainer(tmp_path, tiny_datalora(), steps=2,
                     datalora_config={"temperature_final": 0.1})


def test_task_names_default_to_the_collators_tasks(tmp_path):
    class Collator:
        tasks = ("a", "b", "c", "d")

        def __call__(self, rows):
            return collate(rows)

    model = tiny_datalora()
    args = make_trainer(tmp_path, model, steps=1).args
    trainer = DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                              data_collator=Collator(), calibrate_batches=0)
    assert trainer.task_names == ["a", "b", "c", "d"]


@pytest.mark.parametrize("task_names, match", [
    ("abc", r"^task_names: expected a sequence of task names, got the string 'abc'$"),
    (5, r"^task_names: expected a sequence of task names, got int$"),
    (["a", None], r"^task_names: expected a sequence of task names, got \['a', None\]$"),
    ({"a", "b"}, r"^task_names: expected a sequence of task names, got set$"),  # order
])
def test_task_names_must_be_a_list_of_names(tmp_path, task_names, match):
    """``task_names="abc"`` was taken as ``['a', 'b', 'c']`` (the per-task expert load
    logged under letters); ``5`` failed with "'int' object is not iterable"."""
    model = tiny_datalora()
    args = make_trainer(tmp_path, model, steps=1).args
    with pytest.raises(TypeError, match=match):
        DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                        data_collator=collate, task_names=task_names)
    trainer = DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                              data_collator=collate, task_names=("a", "b"))
    assert trainer.task_names == ["a", "b"]
    trainer = DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                              data_collator=collate, task_names=range(2))  # ids as labels
    assert trainer.task_names == ["0", "1"]

def test_an_empty_train_dataset_is_refused_by_name(tmp_path):
    """``train_dataset=[]`` failed in torch's sampler ("num_samples should be a positive
    integer value, but got num_samples=0"); a dataset without a length still trains."""
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=1, calibrate_batches=0)
    trainer.train_dataset = []
    with pytest.raises(ValueError, match=r"^train_dataset: empty \(0 rows\), nothing to "
                                         r"train on$"):
        trainer.train()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(PatternData().rows)

    trainer.train_dataset = Stream()
    trainer.train()
    assert trainer.state.global_step == 1
    # a ChainDataset of streams has __len__, which raises: the Trainer's has_length says so
    trainer.train_dataset = torch.utils.data.ChainDataset([Stream(), Stream()])
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.global_step == 2


def test_trainer_trains_a_bitsandbytes_4bit_base(tmp_path):
    """A QLoRA-style load (from_pretrained with BitsAndBytesConfig): transformers' Trainer
    refused the quantized model as one "without adapters"."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = tiny_datalora().base_model
    folder = tmp_path / "base"
    MistralForCausalLM(base.config).save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32)
    quantized = MistralForCausalLM.from_pretrained(folder, quantization_config=q,
                                                   device_map="cpu")
    assert quantized.is_quantized
    model = get_datalora_model(quantized, DATALORAConfig(
        num_lora_experts=4, lora_rank=4, num_active_experts=2, routing="shared",
        prune_layers=[1, 3], target_modules=["q_proj", "v_proj"]), verbose=False)
    before = adapter(model)
    make_trainer(tmp_path / "out", model, steps=2).train()
    after = adapter(model)
    assert not all(same(before[k], after[k]) for k in before)


def test_train_keeps_fp32_adapters_on_a_bf16_checkpoint(tmp_path):
    """A model stored in bf16 (as most checkpoints are), trained without bf16=True: the
    adapters' AdamW master weights are fp32 (in bf16, most small updates rounded away)."""
    from datalora.testing import build_tiny_model, build_tokenizer
    from datalora.train import train_datalora

    model = build_tiny_model().to(torch.bfloat16)
    result = train_datalora(None, model=model, tokenizer=build_tokenizer(), max_steps=2,
                            limit=8, batch_size=4, max_length=48, progress=False,
                            output_dir=str(tmp_path / "out"))
    layers = [layer for _, layer in result.model.molora_layers()]
    assert layers and all(p.dtype == torch.float32 for layer in layers
                          for p in layer.parameters() if p.requires_grad)
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in layers)


def test_bf16_training_casts_the_base_as_a_bf16_load_does(tmp_path):
    """train_datalora(bf16=True) on an fp32 model (and the embedded model built in bf16)
    leave the rotary inv_freq in fp32, as from_pretrained(dtype=bf16) does: cast whole, the
    trained base differed from the bf16 base a user reloads the adapter onto."""
    from datalora.testing import build_tiny_model, build_tokenizer, load_model_and_tokenizer
    from datalora.train import train_datalora

    build_tiny_model().save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "m"))
    result = train_datalora(model=model, tokenizer=tokenizer, bf16=True, max_steps=1, limit=4,
                            batch_size=4, max_length=32, progress=False,
                            output_dir=str(tmp_path / "out"))
    reload, _ = load_model_and_tokenizer(str(tmp_path / "m"), dtype=torch.bfloat16)
    trained = result.model.base_model
    assert trained.model.rotary_emb.inv_freq.dtype == torch.float32
    assert build_tiny_model(dtype=torch.bfloat16).model.rotary_emb.inv_freq.dtype \
        == torch.float32
    ids = torch.randint(4, 1000, (1, 300))
    with torch.no_grad(), result.model.disable_adapter():
        assert torch.equal(trained(ids).logits, reload(ids).logits)


def test_a_loaded_model_gets_the_settings_of_the_name_it_was_loaded_from(tmp_path):
    """train_datalora(model=<loaded from a folder or the Hub>) trains as
    train_datalora(model_name_or_path=<that name>): not with the embedded tiny model's
    config and learning rate 3e-2, and the adapter records the real base model."""
    from datalora.testing import build_tiny_model, build_tokenizer, load_model_and_tokenizer
    from datalora.train import train_datalora

    build_tiny_model().save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "m"))
    result = train_datalora(model=model, tokenizer=tokenizer, max_steps=1, limit=4,
                            batch_size=4, progress=False, output_dir=str(tmp_path / "out"))
    assert result.log_history[0]["learning_rate"] == 2e-4
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model"] == str(tmp_path / "m")
    assert saved["prune_layers"] is None and saved["lambda_prune"] == 0.1  # not the tiny ones


def test_the_seed_config_trains_the_datalora_method(tmp_path):
    """Issue 6's snippet as written: the seed model card's DATALORAConfig (no ``routing``)
    builds the DATALORA method on a decoder LM (routing='auto' -> 'shared') and
    DATALORATrainer trains it through the curriculum to the inference state."""
    cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, sliding_window=None, pad_token_id=0)
    torch.manual_seed(0)
    config = DATALORAConfig(base_model=None, num_lora_experts=8, lora_rank=16, lora_alpha=32,
                            target_retention=0.5, num_active_experts=2, temperature_init=5.0,
                            temperature_final=0.5)
    model = get_datalora_model(MistralForCausalLM(cfg), config, verbose=False)
    assert model.datalora_config.routing == "shared" and model.saliency is not None
    trainer = make_trainer(tmp_path, model, steps=6, datalora_config=config)
    trainer.train()
    assert [h["phase"] for h in trainer.datalora_history][-1] == "hardening"
    assert model.curriculum_state() == {"tau": 0.5, "retention": 0.5, "hard": True}


def test_a_datalora_config_that_does_not_define_the_model_is_refused(tmp_path):
    """The trainer's datalora_config may change training settings only: another expert
    count silently clamped expert ids into the wrong load statistics."""
    import dataclasses

    model = tiny_datalora()
    other = dataclasses.replace(model.datalora_config, num_lora_experts=2,
                                num_active_experts=1)
    with pytest.raises(ValueError, match="datalora_config: .*num_lora_experts"):
        make_trainer(tmp_path, model, datalora_config=other)
    with pytest.raises(TypeError, match="datalora_config: expected a DATALORAConfig"):
        make_trainer(tmp_path, model, datalora_config={"lambda_prune": 0.5})
    # 'auto' routing (as the model was built from) and training settings are accepted
    ok = dataclasses.replace(model.datalora_config, routing="auto", lambda_prune=0.5)
    assert make_trainer(tmp_path, model, datalora_config=ok).datalora_config is ok
    bad = dataclasses.replace(model.datalora_config)
    bad.target_retention = 2.0  # assigned after construction: checked by the trainer too
    with pytest.raises(ValueError, match=r"target_retention: expected a value in \(0, 1\]"):
        make_trainer(tmp_path, model, datalora_config=bad)


def test_logged_metrics_are_means_over_the_real_tokens_of_the_step(tmp_path):
    """A 1-step run (hardening, retention 0.5): the logged retention, keep_prob_mean,
    rank_scale_mean, expert load and per-task expert load are those of the step's forward
    over its real tokens only (PatternData pads up to 3 of 16 positions); a task id
    outside ``task_names`` is named by its id, not wrapped around to the last name."""
    from transformers import TrainerCallback

    from datalora.curriculum import CurriculumScheduler

    model = tiny_datalora()
    data = PatternData(n=8, seed=3)
    for row in data.rows[:2]:
        row["task_ids"] = torch.tensor(-1)  # a task the collator did not know
    trainer = make_trainer(tmp_path, model, steps=1, calibrate_batches=0,
                           curriculum=CurriculumScheduler(5.0, 0.5, 0.5, [0.0, 0.0, 1.0]))
    trainer.train_dataset = data
    trainer.args.logging_steps = 1
    batches, records = [], []
    trainer.data_collator = lambda rows: batches.append(collate(rows)) or batches[-1]

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            records.append(model.runtime.last)
    trainer.add_callback(Spy())
    trainer.train()
    [rec] = records
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    valid = rec.valid.reshape(-1)
    assert not bool(valid.all())  # the batch holds padding
    rank_scale = rec.routing.rank_scale.float()[valid]
    want = {"retention": float(rec.kept.reshape(-1)[valid].float().mean()),
            "keep_prob_mean": float(rec.keep_prob.detach().reshape(-1)[valid].float().mean()),
            "rank_scale_mean": float(rank_scale.mean())}
    assert want["retention"] < 0.9 and want["rank_scale_mean"] < 1.0  # pruned, scaled
    for key, value in want.items():
        assert log[key] == pytest.approx(value, abs=2e-6), key
    ids = rec.routing.expert_ids.long().reshape(valid.shape[0], -1)[valid]  # [real, k]
    counts = torch.bincount(ids.reshape(-1), minlength=4).float()
    load = [log[f"expert_load_e{i}"] for i in range(4)]
    assert load == pytest.approx((counts / counts.sum()).tolist(), abs=2e-6)
    # per task: the routes of its sequences' real tokens, as fractions
    seq_valid = rec.valid  # [B, L]
    per_seq = rec.routing.expert_ids.long().reshape(*seq_valid.shape, -1)
    tasks = batches[0]["task_ids"]  # the sampler shuffles the rows
    assert (tasks == -1).sum() == 2
    task_load = trainer.datalora_history[-1]["task_expert_load"]
    names = {-1: "-1", 0: "a", 1: "b", 2: "c", 3: "d"}
    assert set(task_load) == {names[int(t)] for t in tasks.unique()}
    for t in tasks.unique().tolist():
        routes = per_seq[tasks == t][seq_valid[tasks == t]].reshape(-1)
        c = torch.bincount(routes, minlength=4).float()
        assert task_load[names[t]] == pytest.approx((c / c.sum()).tolist(), abs=1e-6), t


def test_training_loss_adds_the_weighted_aux_losses(tmp_path):
    """compute_loss in training: LM loss + lambda_prune * L_retention (0 while dense) +
    alpha_balance * L_balance, the aux part divided by the accumulation steps exactly when
    the Trainer takes the loss as already divided; evaluation returns the LM loss alone."""
    import dataclasses

    model = tiny_datalora()
    cfg = dataclasses.replace(model.datalora_config, lambda_prune=0.7, alpha_balance=0.3)
    trainer = make_trainer(tmp_path, model, steps=1, calibrate_batches=0, datalora_config=cfg)
    batch = collate([PatternData()[i] for i in range(8)])
    model.train()
    trainer.model_accepts_loss_kwargs, trainer.compute_loss_func = False, None
    for retention, lam in ((1.0, 0.0), (0.5, 0.7)):  # dense (warmup): no retention term
        model.set_curriculum_state(tau=1.0, retention=retention, hard=True)
        torch.manual_seed(0)
        total, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
        aux = model.aux_losses()
        assert aux["retention_loss"] > 0 and aux["balance_loss"] > 0
        want = out.loss + lam * aux["retention_loss"] + 0.3 * aux["balance_loss"]
        assert torch.allclose(total, want, rtol=1e-6, atol=1e-7), retention
        # a loss the Trainer takes as divided for 4 accumulation steps: aux / 4 too
        trainer.current_gradient_accumulation_steps = 4
        trainer.loss_is_scaled_for_ga = True
        torch.manual_seed(0)
        total, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
        want = out.loss + (lam * aux["retention_loss"] + 0.3 * aux["balance_loss"]) / 4
        assert torch.allclose(total, want, rtol=1e-6, atol=1e-7), retention
        trainer.current_gradient_accumulation_steps = 1
        trainer.loss_is_scaled_for_ga = None
    model.eval()
    with torch.no_grad():
        batch.pop("task_ids")
        assert torch.equal(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


def test_logged_lm_loss_under_gradient_accumulation_is_the_trainers_loss(tmp_path):
    """With gradient accumulation the Trainer's loss is divided per micro-batch (the tiny
    Mistral takes num_items_in_batch); the logged lm_loss undoes that as the Trainer does
    for its logged loss, which equals it here (aux weights 0: the loss is the LM loss)."""
    import dataclasses

    model = tiny_datalora()
    cfg = dataclasses.replace(model.datalora_config, lambda_prune=0.0, alpha_balance=0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-2, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        remove_unused_columns=False, lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                              data_collator=collate, datalora_config=cfg, calibrate_batches=0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["lm_loss"] == pytest.approx(h["loss"], rel=1e-3), h


def _lm_only_trainer(tmp_path, model, dataset, **kw):
    """A trainer whose loss is the LM loss alone (aux weights 0), logging every 2 steps."""
    import dataclasses

    cfg = dataclasses.replace(model.datalora_config, lambda_prune=0.0, alpha_balance=0.0)
    args = TrainingArguments(**{**dict(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=2,
        learning_rate=3e-2, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, remove_unused_columns=False,
        lr_scheduler_type="constant", dataloader_num_workers=0), **kw})
    return DATALORATrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=collate, datalora_config=cfg, calibrate_batches=0)


def test_logged_metrics_are_means_over_optimizer_steps(tmp_path):
    """16 micro-batches with gradient accumulation 3 make steps of 3, 3, 3, 3, 3 and 1: the
    last log covers steps 5 and 6 (a curriculum phase of its own) and is their mean, as the
    Trainer's loss (it was the mean over the 4 micro-batches, weighting step 5 thrice)."""
    trainer = _lm_only_trainer(tmp_path, tiny_datalora(), PatternData(n=32),
                               gradient_accumulation_steps=3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert [r["step"] for r in trainer.datalora_history] == [2, 4, 6]  # one log per phase
    for h in logs:
        assert h["lm_loss"] == pytest.approx(h["loss"], abs=1e-4), h


def test_a_batch_without_targets_leaves_the_logged_lm_loss_finite(tmp_path):
    """A batch whose labels are all -100 has the LM loss 0 / 0 = NaN; the Trainer leaves it
    out of its logged loss (logging_nan_inf_filter), and so does lm_loss (it was NaN for
    the whole window and its history record)."""
    data = PatternData(n=8)
    data.rows[1] = {**data.rows[1], "labels": torch.full_like(data.rows[1]["labels"], -100)}
    trainer = _lm_only_trainer(tmp_path, tiny_datalora(), data,
                               per_device_train_batch_size=1, max_steps=8)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["lm_loss"]) for h in logs)
    assert all(math.isfinite(r["lm_loss"]) for r in trainer.datalora_history)


def test_a_first_batch_row_without_a_real_token_is_refused(tmp_path):
    """Rows whose attention_mask is all 0 (from a collator other than CausalLMCollator,
    which refuses them) trained the whole run with no token for the saliency network, then
    failed at the end: "scores: no valid token scores to calibrate on". The first training
    batch is checked (once per run: no host sync per step)."""
    data = PatternData(n=8)
    for row in data.rows:
        row["attention_mask"] = torch.zeros_like(row["attention_mask"])
    trainer = _lm_only_trainer(tmp_path, tiny_datalora(), data, max_steps=2)
    with pytest.raises(ValueError, match=r"^inputs: row 0 of the first training batch has no "
                                         r"real token \(attention_mask all 0\)$"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("key", ["input_ids", "labels"])
def test_a_first_batch_id_past_the_vocabulary_is_refused(tmp_path, key):
    """An id past the vocabulary (a row tokenized for a bigger vocabulary) failed inside
    the embedding or the loss (on a GPU: a device-side assert naming nothing); the first
    training batch's ids and labels are checked (-100 labels are ignored)."""
    model = tiny_datalora()
    vocab = model.base_model.get_input_embeddings().num_embeddings
    data = PatternData(n=8)
    for row in data.rows:
        row[key] = row[key].clone()
        row[key][1] = vocab + 3
    trainer = _lm_only_trainer(tmp_path, model, data, max_steps=2)
    also = "" if key == "input_ids" else r" or -100 \(ignored\)"
    with pytest.raises(ValueError, match=rf"^inputs: the first training batch's {key}: "
                                         rf"expected ids in \[0, {vocab}\){also} \(the "
                                         rf"model's vocabulary\), got {vocab + 3}$"):
        trainer.train()
    assert trainer.state.global_step == 0
    if key == "labels":  # a loss of the caller's may read labels otherwise: not checked
        trainer = _lm_only_trainer(tmp_path / "own", tiny_datalora(), data, max_steps=1)
        trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: \
            outputs.logits.float().mean() * 0 + 1.0
        trainer.train()
        assert trainer.state.global_step == 1


def test_a_frozen_reloaded_model_is_refused_before_training(tmp_path):
    """from_pretrained loads frozen (inference) by default: train() failed inside backward
    ("element 0 of tensors does not require grad"); it names is_trainable now."""
    from datalora import DATALORAModel

    model = tiny_datalora()
    model.save_pretrained(tmp_path / "adapter")
    cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, sliding_window=None, pad_token_id=0)
    torch.manual_seed(0)
    frozen = DATALORAModel.from_pretrained(MistralForCausalLM(cfg), tmp_path / "adapter")
    trainer = _lm_only_trainer(tmp_path / "run", frozen, PatternData(n=8), max_steps=1)
    with pytest.raises(ValueError, match="no trainable parameters .* is_trainable=True"):
        trainer.train()


def test_a_train_after_an_interrupted_one_logs_only_its_own_steps(tmp_path):
    """A run interrupted between two logs (a KeyboardInterrupt in a notebook) leaves its
    metric sums behind; the next train() starts from zero: its logged lm_loss is the mean
    over its own steps, the Trainer's logged loss (aux weights 0: the loss is the LM loss)."""
    import dataclasses

    from transformers import TrainerCallback

    model = tiny_datalora()
    cfg = dataclasses.replace(model.datalora_config, lambda_prune=0.0, alpha_balance=0.0)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
        learning_rate=3e-2, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, remove_unused_columns=False,
        lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = DATALORATrainer(model=model, args=args, train_dataset=PatternData(),
                              data_collator=collate, datalora_config=cfg, calibrate_batches=0)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise KeyboardInterrupt

    trainer.add_callback(Interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.remove_callback(Interrupt)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)  # steps 1-2: warmup
    assert log["step"] == 2 and log["lm_loss"] == pytest.approx(log["loss"], rel=1e-5), log


def test_epochs_curriculum_counts_a_partial_accumulation_as_a_step(tmp_path):
    """8 batches an epoch with gradient_accumulation_steps=3 are 3 optimizer steps (the
    last accumulates 2 batches), as the Trainer counts them: max_steps=2 is 2/3 epoch."""
    from datalora.curriculum import CurriculumScheduler

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
        gradient_accumulation_steps=3, learning_rate=3e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    curriculum = CurriculumScheduler(mode="epochs")
    trainer = DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=PatternData(),
                              data_collator=collate, calibrate_batches=0,
                              curriculum=curriculum)
    trainer.train()
    assert curriculum.num_epochs == pytest.approx(2 / 3)


def test_calibration_reads_max_batches_batches(tmp_path):
    from datalora.module_modes import eval_mode

    trainer = make_trainer(tmp_path, tiny_datalora(), steps=1, calibrate_batches=0)
    calls, layers_run = [], []
    dl = trainer.datalora_model
    dl.register_forward_pre_hook(lambda *a: calls.append(1))
    dl.runtime.layers[0].register_forward_hook(lambda *a: layers_run.append(1))
    threshold = trainer.calibrate_keep_threshold(max_batches=2)
    assert len(calls) == 2
    assert layers_run == []  # the scores need the embeddings only: no decoder layer ran
    calls.clear()
    # the same threshold as from whole forwards
    scores, valid = [], []
    with torch.no_grad(), eval_mode(dl):
        for _, batch in zip(range(2), trainer.get_train_dataloader(), strict=False):
            dl(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            scores.append(dl.runtime.last.saliency.token_scores.reshape(-1))
            valid.append(dl.runtime.last.valid.reshape(-1))
    assert layers_run
    calls.clear()
    assert dl.runtime.calibrate(torch.cat(scores)[torch.cat(valid)],
                                retention=trainer._final_state()[1]) == threshold
    trainer.calibrate_keep_threshold()  # calibrate_batches=0 skips the end of training only
    assert len(calls) == 4
    calls.clear()
    for bad in (0, -1, 1.5):  # 0 read no batch and blamed the dataset
        with pytest.raises(ValueError, match="max_batches"):
            trainer.calibrate_keep_threshold(max_batches=bad)
    assert calls == []


def test_trainer_refuses_a_model_or_curriculum_of_another_type(tmp_path):
    with pytest.raises(TypeError, match="model: expected a DATALORAModel"):
        make_trainer(tmp_path, tiny_datalora().base_model)
    with pytest.raises(TypeError, match="curriculum: expected a CurriculumScheduler, got dict"):
        make_trainer(tmp_path, tiny_datalora(), curriculum={"mode": "epochs"})


def test_eval_mode_runs_train_overrides_when_it_gives_the_modes_back():
    """Leaving the block set the flags only: an overridden train() (transformers 5 switches
    its kernels' mode there) saw eval() but never the way back."""
    from datalora.module_modes import eval_mode

    calls = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = Recording().train()
    model.inner.eval()
    calls.clear()
    with eval_mode(model):
        assert not model.training
    assert calls == [False, True] and model.training and not model.inner.training


def test_evaluation_and_calibration_give_back_each_modules_own_mode(tmp_path):
    """Both ended with ``model.train(was_training)``, which set every submodule to the top
    module's mode (a frozen base kept in eval came back in training mode: dropout on)."""
    from datalora.testing import build_tokenizer
    from datalora.train import evaluate_loss

    model = tiny_datalora()
    model.train()
    model.base_model.model.layers[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 2
    tok = build_tokenizer(vocab_size=300)
    model.base_model.resize_token_embeddings(len(tok))
    evaluate_loss(model, [{"question": "q", "response": "r"}], tok)
    assert {name: m.training for name, m in model.named_modules()} == modes
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=1, calibrate_batches=0)
    dl = trainer.datalora_model.train()
    dl.base_model.model.layers[0].eval()
    modes = {name: m.training for name, m in dl.named_modules()}
    trainer.calibrate_keep_threshold(max_batches=1)
    assert {name: m.training for name, m in dl.named_modules()} == modes


def test_a_folder_saved_again_keeps_no_stale_pending_metrics(tmp_path):
    """A save with steps since the last log writes their metric sums; saving the same
    folder again after a log must remove them, or a resume from it restores stale sums."""
    from transformers import TrainerCallback

    from datalora.trainer import PENDING_NAME

    out = tmp_path / "saved"
    trainer = make_trainer(tmp_path / "run", tiny_datalora(), steps=4, calibrate_batches=0)
    seen = []

    class SaveAtStep3(TrainerCallback):  # logging_steps=2: step 3 is not logged yet
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                trainer.save_model(str(out))
                seen.append(json.loads((out / PENDING_NAME).read_text())["count"])
    trainer.add_callback(SaveAtStep3())
    trainer.train()
    assert seen == [1]
    trainer.save_model(str(out))  # after the log of step 4: nothing pending
    assert not (out / PENDING_NAME).exists()


def test_auto_find_batch_size_retry_starts_a_fresh_curriculum_and_history(tmp_path):
    """accelerate's batch-size search runs the training loop again after an out-of-memory
    error, with more steps: the curriculum kept the first attempt's length (hardening began
    early) and the history its records (a duplicate step and a false step-0 record)."""
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
        auto_find_batch_size=True, learning_rate=3e-2, logging_steps=2, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        remove_unused_columns=False, lr_scheduler_type="constant", dataloader_num_workers=0)
    trainer = DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=PatternData(),
                              data_collator=collate, calibrate_batches=0)
    backward, failed = trainer.accelerator.backward, []

    def out_of_memory_once(loss, **kwargs):
        if not failed and trainer.state.global_step >= 2:
            failed.append(trainer._train_batch_size)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return backward(loss, **kwargs)

    trainer.accelerator.backward = out_of_memory_once
    trainer.train()
    # accelerate retries at 7 (0.9x; 1.3 halves it: 4): 64 rows take more steps than 8
    retried = trainer._train_batch_size
    total = math.ceil(64 / retried)
    assert failed == [8] and retried < 8 and total > 8
    assert trainer.state.max_steps == trainer.curriculum.total_steps == total
    steps = [record["step"] for record in trainer.datalora_history]
    assert steps == sorted(set(steps)) and steps[0] > 0 and steps[-1] == total
    schedule = CurriculumScheduler.from_config(trainer.datalora_config, total_steps=total)
    for record in trainer.datalora_history:
        assert record["phase"] == PHASES[schedule.state_at(record["step"] - 1).phase_index]


def test_resuming_a_weights_only_checkpoint_is_refused(tmp_path):
    """save_only_model checkpoints resumed with a fresh optimizer and the learning-rate
    schedule from its start, while the curriculum and history continued as if exact."""
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=6, save_steps=3,
                           calibrate_batches=0)
    trainer.args.save_only_model = True
    trainer.train()
    again = make_trainer(tmp_path, tiny_datalora(), steps=6, calibrate_batches=0)
    with pytest.raises(ValueError, match=r"checkpoint-3 holds no optimizer or scheduler state "
                                         r"\(saved with save_only_model=True\?\)"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


@pytest.mark.parametrize("layout, missing", [
    ({"global_step4": None}, []),  # DeepSpeed: optimizer and scheduler in its own folder
    ({"optimizer_0": None, "scheduler.pt": b""}, []),  # FSDP: sharded optimizer folder
    ({"optimizer.pt": b"", "scheduler.pt": b""}, []),
    ({"optimizer.pt": b""}, ["scheduler"]),
    ({}, ["optimizer", "scheduler"]),  # save_only_model=True
])
def test_resumable_checkpoint_layouts(tmp_path, layout, missing):
    """DeepSpeed and FSDP checkpoints keep their optimizer / scheduler state in their own
    files: refusing them as weights-only would block an exact resume."""
    from datalora.checkpoints import check_resumable, missing_training_state

    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    for name, content in layout.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    assert missing_training_state(tmp_path) == missing
    if missing:
        with pytest.raises(ValueError, match="resume_from_checkpoint: .* holds no "
                                             + " or ".join(missing)):
            check_resumable(tmp_path)
    else:
        check_resumable(tmp_path)


def test_loading_a_best_checkpoint_from_before_hardening_warns(tmp_path):
    """load_best_model_at_end took a warmup checkpoint (evaluated dense) and train() set it
    to the final pruned, hard state without a word."""
    trainer = make_trainer(tmp_path, tiny_datalora(), steps=12, save_steps=3,
                           calibrate_batches=0, eval_dataset=PatternData(n=16, seed=1))
    trainer.args.eval_strategy = "steps"
    trainer.args.eval_steps = 3
    trainer.args.load_best_model_at_end = True
    trainer.args.metric_for_best_model = "eval_loss"
    trainer.args.greater_is_better = True  # the worst loss: an early checkpoint
    with pytest.warns(UserWarning, match=r"best checkpoint .*checkpoint-3 was saved in the "
                                         r"warmup phase"):
        trainer.train()


@pytest.mark.parametrize("lacking, message", [
    (PENDING_NAME, r"the first DATALORA record after it averages only the steps after "
                   r"step 3, not those since the last log \(step 2\)"),
    (HISTORY_NAME, r"the resumed datalora_history starts after step 3"),
])
def test_resuming_a_checkpoint_of_an_older_release_says_what_its_records_lack(
        tmp_path, lacking, message):
    """Checkpoints saved before the history / the pending metric sums were resumed with the
    same weights but silently shorter or partial DATALORA records."""
    make_trainer(tmp_path, tiny_datalora(), steps=6, save_steps=3,
                 calibrate_batches=0).train()
    checkpoint = tmp_path / "checkpoint-3"
    (checkpoint / lacking).unlink()  # as an older release saved it
    again = make_trainer(tmp_path, tiny_datalora(), steps=6, calibrate_batches=0)
    with pytest.warns(UserWarning, match=message):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_torch_compile_trains_through_the_curriculum_as_eager(tmp_path):
    """TrainingArguments(torch_compile=True): the three phases run compiled (AOT autograd,
    as Inductor; a few graphs, not one per step) and log the eager run's losses."""
    from torch._dynamo.utils import counters

    def losses(name, **compile_args):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=8,
            learning_rate=3e-2, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
            remove_unused_columns=False, lr_scheduler_type="constant",
            dataloader_num_workers=0, **compile_args)
        trainer = DATALORATrainer(model=tiny_datalora(), args=args, train_dataset=PatternData(),
                                  data_collator=collate, task_names=["a", "b", "c", "d"])
        trainer.train()
        rows = [h for h in trainer.datalora_history if "loss" in h]
        assert [h["phase"] for h in rows] == [p for p in PHASES for _ in range(2)]
        return torch.tensor([h["loss"] for h in rows])

    want = losses("eager")
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    got = losses("compiled", torch_compile=True, torch_compile_backend="aot_eager")
    compiled_graphs = counters["stats"]["unique_graphs"] - graphs
    torch._dynamo.reset()
    assert 1 <= compiled_graphs <= 4, compiled_graphs
    torch.testing.assert_close(got, want)
