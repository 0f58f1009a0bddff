"""Prefill speed of a pruned DATALORA model: a prompt's cached forward, packed or not.

    python -m benchmarks.bench_prefill [--out DIR] [--budget-s 20] [--hidden 128]
                                       [--layers 4] [--batch 4] [--prompt-tokens 512]

The first forward of ``generate`` (a batch of prompts into an empty KV cache), every
method on the same randomly initialised embedded Mistral-shaped model (``--hidden`` /
``--layers`` scale it), timed round-robin, medians in ms per prefill:

- ``base``: the base model alone;
- ``datalora_pruned``: ``get_datalora_model`` with the default config (8 experts, top-2,
  rank 16, shared saliency routing, token pruning over the second half of the layers) at
  retention 0.5, its keep threshold calibrated on 8 random sequences: the pruned layers run
  packed on the prompt's kept tokens, their keys / values written at their positions;
- ``datalora_unpacked``: the same model and cache contents, the pruned layers run on
  every prompt token with the pruned ones masked (their output replaced by the bypass):
  what a cached prefill did before the packed one, and what a cache other than a plain
  ``DynamicCache`` still gets;
- ``datalora_dense``: the same model with token pruning off.

Writes ``benchmarks/results/prefill_cpu.json`` (``prefill_cuda.json`` on a GPU) with each
method's median, the ratios to ``base`` and ``datalora_dense`` (``datalora_pruned``'s also
to ``datalora_unpacked``) with 95 % bootstrap intervals, the fraction of the prompt tokens
the pruned model kept, and the ideal speedup of pruning the range at that fraction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.bench_decode import (
    build_methods,
    model_size_cli,
    parse_model_size_cli,
    ratio_columns,
    run_meta,
)
from benchmarks.bench_pruning import ideal_speedup
from benchmarks.molora import write_result
from benchmarks.timing import time_interleaved
from datalora.cli import int_at_least
from datalora.hf_compat import cache_kwargs

SCHEMA = "datalora.benchmarks.prefill/1"
METHODS = ("base", "datalora_pruned", "datalora_unpacked", "datalora_dense")
REFERENCES = {"base": ("datalora_dense",), "datalora_pruned": ("base", "datalora_dense",
                                                               "datalora_unpacked"),
              "datalora_unpacked": ("base", "datalora_dense"), "datalora_dense": ("base",)}


def _unpacked_cache_type() -> type:
    """A ``DynamicCache`` subclass: the DATALORA hooks pack a cached forward's pruned layers
    only for a plain ``DynamicCache``, so this one runs them on every token, masked."""
    from transformers import DynamicCache

    return type("UnpackedDynamicCache", (DynamicCache,), {})


def _prefill(model, prompt: torch.Tensor, cache_type: type | None = None,
             pruning: bool | None = None):
    """One cached forward of ``prompt`` into a fresh cache (``cache_type``: the model makes
    its own ``DynamicCache`` when None)."""
    def run():
        if pruning is not None:
            model.runtime.pruning_enabled = pruning
        cache = {} if cache_type is None else cache_kwargs(model, cache_type(config=model.config))
        model(input_ids=prompt, use_cache=True, **cache)
    return run


@torch.no_grad()
def run(out: Path, *, budget_s: float = 20.0, hidden: int = 128, layers: int = 4,
        batch: int = 4, prompt_tokens: int = 512) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the adapters' and saliency network's init: the same models per run
    models = build_methods(hidden, layers, device)
    datalora = models["datalora"]
    g = torch.Generator().manual_seed(0)
    vocab = models["base"].config.vocab_size
    prompt = torch.randint(4, vocab, (batch, prompt_tokens), generator=g).to(device)
    steps = {"base": _prefill(models["base"], prompt),
             "datalora_pruned": _prefill(datalora, prompt, pruning=True),
             "datalora_unpacked": _prefill(datalora, prompt, _unpacked_cache_type(), True),
             "datalora_dense": _prefill(datalora, prompt, pruning=False)}
    timed = time_interleaved(steps, device, budget_s, 5, 2000, order_seed=0)
    times = {name: res[5] for name, res in timed.items()}
    medians = {name: timed[name][0] for name in METHODS}
    steps["datalora_pruned"]()
    record = datalora.runtime.own_last
    if record.mode != "packed":
        raise RuntimeError(f"the pruned prefill ran {record.mode!r}, not packed")
    kept = record.actual_retention()
    rows = []
    for name in METHODS:
        row = dict(method=name, ms_per_prefill=medians[name],
                   tokens_per_s=batch * prompt_tokens * 1e3 / medians[name],
                   rounds=timed[name][4])
        row.update(ratio_columns(name, REFERENCES[name], medians, times))
        rows.append(row)
    start, end = datalora.runtime.start, datalora.runtime.end
    meta = dict(run_meta(device, hidden, layers), batch=batch,
                prompt_tokens=prompt_tokens, pruned_layers=[start, end],
                datalora_pruned_kept_fraction=kept,
                ideal_speedup_at_kept_fraction=ideal_speedup(layers, (start, end), kept))
    return write_result(out, SCHEMA, meta, rows, [])


def main(argv: list[str] | None = None) -> int:
    name = "prefill_cuda.json" if torch.cuda.is_available() else "prefill_cpu.json"
    parser = model_size_cli("python -m benchmarks.bench_prefill", __doc__, name, min_layers=2)
    parser.add_argument("--batch", type=int_at_least(1), default=4,
                        help="prompts per prefill (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int_at_least(2), default=512,
                        help="tokens per prompt, at most 512 (default: %(default)s)")
    args = parse_model_size_cli(parser, argv)
    if args.prompt_tokens > 512:
        parser.error(f"--prompt-tokens: expected at most 512 (the embedded model's "
                     f"positions), got {args.prompt_tokens}")
    result = run(args.out / name, budget_s=args.budget_s, hidden=args.hidden,
                 layers=args.layers, batch=args.batch, prompt_tokens=args.prompt_tokens)
    meta = result["meta"]
    print(f"prefill of {meta['batch']} x {meta['prompt_tokens']} tokens, "
          f"{meta['datalora_pruned_kept_fraction']:.0%} kept over layers "
          f"{meta['pruned_layers'][0]}-{meta['pruned_layers'][1] - 1} "
          f"(ideal {meta['ideal_speedup_at_kept_fraction']:.2f}x):")
    for row in result["results"]:
        ratios = ", ".join(f"{row[f'vs_{ref}']:.2f}x {ref}" for ref in REFERENCES[row["method"]])
        print(f"  {row['method']:18s} {row['ms_per_prefill']:8.2f} ms  ({ratios})")
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
