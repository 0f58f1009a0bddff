"""The embedded multi-task instruction dataset, dataset loading, prompt format and collation.

Rows follow OpenOrca's column format plus a ``task`` column::

    {"id": "arithmetic.0.17", "system_prompt": "...", "question": "What is 23 + 58?",
     "response": "81", "task": "arithmetic"}

The shipped splits (``datalora/shipped-data/multitask_{train,eval}.jsonl``) are written by
``python -m datalora.data`` from :func:`generate_multitask_dataset` with fixed seeds;
a test checks they equal the generator's output (:mod:`~datalora.data.multitask`).

Loading a real dataset (a local JSONL / JSON / parquet file, a ``datasets`` folder, or a
Hub name) goes through :func:`load_instruction_dataset` and returns rows with the same
columns, so the demo and the trainer treat the embedded data and real data alike. Alpaca
rows (``instruction`` / ``input`` / ``output``) and single-turn chat rows (``messages``:
optional system, user, assistant) are mapped to these columns (:mod:`~datalora.data.loading`).
Prompts and tokenization: :mod:`~datalora.data.tokens`; batches: :mod:`~datalora.data.collate`.
"""

from datalora.data.collate import CausalLMCollator, check_task_names, first_row_without_token
from datalora.data.loading import (
    EVAL_SPLITS,
    REQUIRED_COLUMNS,
    UNKNOWN_TASK,
    SplitNotFoundError,
    load_eval_rows,
    load_instruction_dataset,
    looks_like_local_path,
    normalize_rows,
)
from datalora.data.multitask import (
    COLUMNS,
    SHIPPED_SPLITS,
    SYSTEM_PROMPTS,
    TASKS,
    generate_multitask_dataset,
    shipped_split_path,
    shipped_split_rows,
    write_jsonl,
)
from datalora.data.tokens import (
    IGNORE_INDEX,
    TOKENIZE_CHUNK,
    TokenizeStats,
    appended_special_ids,
    format_prompt,
    prompt_inputs,
    response_start,
    strip_appended,
    tokenize_example,
    tokenize_rows,
)

__all__ = [
    "COLUMNS",
    "EVAL_SPLITS",
    "IGNORE_INDEX",
    "REQUIRED_COLUMNS",
    "SHIPPED_SPLITS",
    "SYSTEM_PROMPTS",
    "TASKS",
    "TOKENIZE_CHUNK",
    "UNKNOWN_TASK",
    "CausalLMCollator",
    "format_prompt",
    "SplitNotFoundError",
    "TokenizeStats",
    "appended_special_ids",
    "check_task_names",
    "first_row_without_token",
    "generate_multitask_dataset",
    "load_eval_rows",
    "load_instruction_dataset",
    "looks_like_local_path",
    "normalize_rows",
    "prompt_inputs",
    "response_start",
    "shipped_split_path",
    "shipped_split_rows",
    "strip_appended",
    "tokenize_example",
    "tokenize_rows",
    "write_jsonl",
]
