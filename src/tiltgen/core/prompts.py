"""Prompt files (.txt, .jsonl, .csv) and the per-image seeds of a prompt-file job.

A prompt read from a file is a :class:`Prompt`: a ``str`` (so tokenizers and every reward take
it unchanged) that also carries the row's extra fields (``prompt.fields``), for rewards that
need per-prompt metadata (an expected object count, a reference caption, ...).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TiltgenError

# prompt i's images use seeds base + PROMPT_SEED_STRIDE * i + j: fixed by (global seed, prompt index,
# sample index) alone, so independent of --n, batch size and process count, and "seed + j" for one prompt
PROMPT_SEED_STRIDE = 1_000_000
RESERVED = ("prompt", "seed", "negative_prompt")


class Prompt(str):
    """A prompt string with the extra fields of its prompt-file row (``fields``, a dict)."""

    fields: dict[str, Any]

    def __new__(cls, text: str, fields: dict[str, Any] | None = None) -> "Prompt":
        self = super().__new__(cls, text)
        self.fields = dict(fields or {})
        return self

    def __reduce__(self) -> tuple:  # pickles (e.g. across processes) with its fields
        return (Prompt, (str(self), self.fields))


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a job: its text, optional own seed and negative prompt, extra fields, and
    where it came from (``source``: "file:line" or "--prompt")."""

    text: str
    seed: int | None = None
    negative_prompt: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = "--prompt"

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.text, self.fields)


def image_seed(global_seed: int, prompt_index: int, sample_index: int, row_seed: int | None = None) -> int:
    """The seed of image ``sample_index`` of prompt ``prompt_index``: the row's own seed + j if the
    prompt file gave one, else global_seed + PROMPT_SEED_STRIDE * prompt_index + j."""
    base = row_seed if row_seed is not None else global_seed + PROMPT_SEED_STRIDE * prompt_index
    return base + sample_index


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """The prompts of a .txt (one per line), .jsonl (``prompt``, optional ``seed`` and
    ``negative_prompt``, any other keys become fields) or .csv (a ``prompt`` column, same optional
    columns) file. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TiltgenError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TiltgenError(f"prompts file {path} is not UTF-8 text ({error.reason})") from None
    if suffix == ".jsonl":
        rows = _jsonl_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        rows = [PromptRow(line.strip(), source=f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    if not rows:
        raise TiltgenError(f"prompts file {path} holds no prompt (it is empty or has only blank lines)")
    return rows


def _row(path: Path, line: int, record: dict[str, Any]) -> PromptRow:
    where = f"{path}:{line}"
    if "prompt" not in record:
        raise TiltgenError(f"{where}: no 'prompt' field (found: {', '.join(sorted(record)) or 'nothing'})")
    text = record["prompt"]
    if not isinstance(text, str):
        raise TiltgenError(f"{where}: 'prompt' must be a string, got {text!r}")
    seed = record.get("seed")
    if seed is not None and seed != "":
        seed = _integer_seed(seed, where)
    else:
        seed = None
    negative = record.get("negative_prompt") or None
    if negative is not None and not isinstance(negative, str):
        raise TiltgenError(f"{where}: 'negative_prompt' must be a string, got {negative!r}")
    fields = {k: v for k, v in record.items() if k not in RESERVED}
    return PromptRow(text, seed, negative, fields, where)


def _integer_seed(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise TiltgenError(f"{where}: seed must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise TiltgenError(f"{where}: seed must be an integer, got {value!r}")


def _jsonl_rows(path: Path, text: str) -> list[PromptRow]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TiltgenError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise TiltgenError(f"{path}:{line_number}: expected a JSON object with a 'prompt' field, "
                               f"got {type(record).__name__}")
        rows.append(_row(path, line_number, record))
    return rows


def _csv_rows(path: Path, text: str) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        return []
    if "prompt" not in reader.fieldnames:
        raise TiltgenError(f"{path}:1: the header has no 'prompt' column (columns: {', '.join(reader.fieldnames)})")
    rows = []
    for record in reader:
        line_number = reader.line_num
        if None in record:
            raise TiltgenError(f"{path}:{line_number}: more values than header columns")
        if not any((v or "").strip() for v in record.values()):
            continue
        rows.append(_row(path, line_number, {k: v for k, v in record.items() if v is not None}))
    return rows
