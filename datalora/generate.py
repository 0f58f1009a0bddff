"""``python -m datalora generate``: answers from a saved DATALORA adapter.

    python -m datalora generate --adapter DIR [--model PATH_OR_NAME] [--tokenizer ...]
        [--prompt TEXT ...] [--prompts-file FILE] [--system-prompt TEXT] [--batch-size 8]
        [--max-new-tokens 64] [--no-pruning] [--sample [--temperature 0.7] [--top-p 0.95]]
        [--seed 0] [--bf16] [--json]

The adapter folder (what ``datalora train`` or ``save_pretrained`` wrote) records its base
model in its config (``base_model``; none: the embedded tiny model); ``--model`` loads it
from elsewhere (a local folder or a Hub name). Each prompt is asked as training asked its
questions (``### Question:`` ... ``### Answer:``, after ``--system-prompt`` if given),
with the calibrated token pruning (``--no-pruning``: every token through every layer)
and a KV cache, ``--batch-size`` prompts at a time (left-padded); greedy unless
``--sample``. ``--prompts-file`` reads one prompt per line (blank lines skipped). The
answers are printed with the share of each prompt's tokens the pruned layers kept, or as
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datalora.cli import fraction, int_at_least, plain_text, positive_float
from datalora.config import DATALORAConfig
from datalora.data import format_prompt, prompt_inputs
from datalora.model import DATALORAModel


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the non-blank lines of ``--prompts-file``; at least
    one."""
    out = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file: no such file {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompts_file: {path} is not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start})") from None
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise ValueError("prompts: none given; pass --prompt TEXT or --prompts-file FILE")
    return out


def load_adapter_model(adapter: str | Path, model_name_or_path: str | None = None,
                       tokenizer: str | None = None, bf16: bool = False
                       ) -> tuple[DATALORAModel, Any]:
    """The saved adapter on its base (the config's ``base_model`` unless
    ``model_name_or_path``), frozen, in eval mode, on the GPU when there is one it fits
    (else on the CPU, with a warning); and the tokenizer."""
    from datalora.testing import QUANTIZE_GPU_HEADROOM, load_model_and_tokenizer, to_gpu_if_it_fits

    config = DATALORAConfig.from_pretrained(adapter)
    base = model_name_or_path if model_name_or_path is not None else config.base_model
    dtype = torch.bfloat16 if bf16 else None
    model, tok = load_model_and_tokenizer(base, dtype=dtype, tokenizer=tokenizer)
    # an NF4 adapter's base is quantized on the GPU (it holds the 16-bit base first)
    to_gpu_if_it_fits(model, QUANTIZE_GPU_HEADROOM if config.quantize else 1.1,
                      "to generate there", "generation runs on the CPU")
    return DATALORAModel.from_pretrained(model, adapter), tok


def answer_prompts(model: DATALORAModel, tokenizer: Any, prompts: list[str],
                   max_new_tokens: int, sample: bool, temperature: float,
                   top_p: float, system_prompt: str = "") -> list[dict[str, Any]]:
    """``{"prompt", "answer", "prompt_tokens_kept"}`` per prompt, generated as one batch
    (left-padded), each prompt after ``system_prompt`` as training formats rows:
    ``prompt_tokens_kept`` is the share of the prompt's tokens the pruned layers kept in
    its prefill, as generation decided it (1 with pruning off or an uncalibrated keep
    threshold; None for a model without token pruning)."""
    device = next(model.parameters()).device
    texts = [format_prompt({"system_prompt": system_prompt, "question": p}) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's prompt ends where generation starts
    try:
        inputs = prompt_inputs(tokenizer, texts, device, padding=len(texts) > 1)
    finally:
        tokenizer.padding_side = side
    options = (dict(do_sample=True, temperature=temperature, top_p=top_p) if sample
               else dict(do_sample=False))
    records = []  # the prompts' prefill's record (the first forward's; not every step's)

    def record_prefill(*_: Any) -> None:  # runs after the runtime's own hook
        if not records:
            records.append(model.runtime.own_last)

    hook = (None if model.runtime is None
            else model.base_model.register_forward_hook(record_prefill))
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **options)
    finally:
        if hook is not None:
            hook.remove()
    kept: list[float | None] = [None] * len(prompts)
    if records and records[0] is not None:
        valid = records[0].valid
        kept = ((records[0].kept & valid).sum(1) / valid.sum(1).clamp_min(1)).tolist()
    answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                     skip_special_tokens=True)
    return [{"prompt": p, "answer": a.strip(), "prompt_tokens_kept": k}
            for p, a, k in zip(prompts, answers, kept, strict=True)]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = read_prompts(args.prompt, args.prompts_file)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        model, tokenizer = load_adapter_model(args.adapter, args.model, args.tokenizer,
                                              args.bf16)
        if args.no_pruning and model.runtime is not None:
            model.set_curriculum_state(retention=1.0)
        torch.manual_seed(args.seed)
        batches = [prompts[i:i + args.batch_size]
                   for i in range(0, len(prompts), args.batch_size)]
        results = [row for batch in tqdm(batches, desc="generating", unit="batch",
                                         disable=len(batches) < 2, dynamic_ncols=True)
                   for row in answer_prompts(model, tokenizer, batch, args.max_new_tokens,
                                             args.sample, args.temperature, args.top_p,
                                             args.system_prompt)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            kept = ("" if r["prompt_tokens_kept"] is None
                    else f"   (prompt tokens kept: {100 * r['prompt_tokens_kept']:.0f}%)")
            print(f"Q: {r['prompt']}\nA: {r['answer'] or '(empty: EOS at once)'}{kept}\n")
    return results


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="answer prompts with a saved DATALORA adapter",
                              description=plain_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True,
                   help="the adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", default=None,
                   help="base model folder or Hub name (default: the adapter config's "
                        "base_model; none: the embedded tiny model)")
    p.add_argument("--tokenizer", default=None,
                   help="a folder or Hub name to load the tokenizer from (default: the "
                        "model's)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a question to answer (repeat for several)")
    p.add_argument("--prompts-file", default=None,
                   help="a UTF-8 text file, one question per line")
    p.add_argument("--system-prompt", default="",
                   help="put before every question, as a row's system_prompt is in "
                        "training (default: none)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="prompts generated together, left-padded (default: 8)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64,
                   help="tokens to generate at most per answer (default: 64)")
    p.add_argument("--no-pruning", action="store_true",
                   help="run every prompt token through every layer (default: the "
                        "adapter's calibrated pruning)")
    p.add_argument("--sample", action="store_true",
                   help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=0.7,
                   help="with --sample (default: 0.7)")
    p.add_argument("--top-p", type=fraction, default=0.95,
                   help="with --sample (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--bf16", action="store_true", help="load the base in bf16")
    p.add_argument("--json", action="store_true",
                   help="print the answers as JSON on stdout; other output goes to stderr")
    p.set_defaults(func=run, flag_names={
        "path": "--adapter", "name_or_path": "--model", "tokenizer": "--tokenizer",
        "prompts_file": "--prompts-file"})
