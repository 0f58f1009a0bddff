"""``python -m datalora.data``: rewrite the shipped JSONL splits from the generator."""

from pathlib import Path

from datalora.data.multitask import _DATA_DIR, SHIPPED_SPLITS, shipped_split_rows, write_jsonl


def _main() -> None:
    """Rewrite the shipped JSONL files in the source tree from the generator."""
    folder = Path(__file__).resolve().parents[1] / _DATA_DIR
    folder.mkdir(exist_ok=True)
    for split in SHIPPED_SPLITS:
        rows = shipped_split_rows(split)
        write_jsonl(rows, folder / f"multitask_{split}.jsonl")
        print(f"wrote {len(rows)} rows to {folder / f'multitask_{split}.jsonl'}")


if __name__ == "__main__":
    _main()
