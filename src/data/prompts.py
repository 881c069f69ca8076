"""Prompts to continue, for ``predict`` with a causal language model: a text file (one prompt per
line) or a JSONL file (a ``prompt`` field per line)."""

from __future__ import annotations

import json
from pathlib import Path

from src.core.errors import DataError


class PromptDataset:
    """The prompts of ``path``, in file order; a batch is ``{"prompt": [str, ...]}``."""

    batched = True  # __getitems__ builds the batch itself

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"--prompts: {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"--prompts: {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        self.prompts: list[str] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"--prompts: {path}:{n}: not JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise DataError(f"--prompts: {path}:{n}: needs a string 'prompt' field")
                self.prompts.append(record["prompt"])
            else:
                self.prompts.append(line)
        if not self.prompts:
            raise DataError(f"--prompts: {path}: holds no prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitems__(self, indices: list[int]) -> dict[str, list[str]]:
        return {"prompt": [self.prompts[i] for i in indices]}

    def __getitem__(self, i: int) -> dict[str, str]:
        return {"prompt": self.prompts[i]}
