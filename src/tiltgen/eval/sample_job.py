"""A sampling job over many prompts: fixed per-image seeds, chunks spread over processes, a
crash-safe ledger, and a manifest with one row per image.

Layout of an output folder::

    images/PPPPPP_SSS.png      image S of prompt P
    manifest.jsonl             one row per image (manifest.parquet when pyarrow is installed)
    sample.json                the job's settings, timings and mean rewards
    .work/config.json          while unfinished: the settings the images were made with
    .work/ledger-R.jsonl       while unfinished: one line per finished chunk of process R

The work is cut into chunks of ``batch_size`` images in a fixed order and chunk k goes to
process k mod N, so an image depends on its seed and its chunk only: the same for any number of
processes. A chunk counts as done once its ledger line is written (after its PNGs), so a kill at
any moment loses at most the chunks in flight, and a rerun redoes exactly those.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.distributed import Processes
from ..core.files import atomic_write, write_json
from ..core.prompts import Prompt, PromptRow, image_seed
from ..errors import TiltgenError

IMAGES = "images"
WORK = ".work"


@dataclass(frozen=True)
class ImageItem:
    """One image to make: prompt ``prompt_index``'s sample ``sample_index`` with ``seed``."""

    prompt_index: int
    sample_index: int
    seed: int
    prompt: Prompt
    negative_prompt: str | None

    @property
    def file(self) -> str:
        return f"{IMAGES}/{self.prompt_index:06d}_{self.sample_index:03d}.png"


def plan_items(rows: Sequence[PromptRow], n: int, global_seed: int, negative_prompt: str | None = None
               ) -> list[ImageItem]:
    """Every image of the job, prompt by prompt; a row's own negative prompt wins over the job's."""
    return [ImageItem(p, j, image_seed(global_seed, p, j, row.seed), row.prompt, row.negative_prompt or negative_prompt)
            for p, row in enumerate(rows) for j in range(n)]


def chunked(items: Sequence[ImageItem], batch_size: int) -> list[list[ImageItem]]:
    if batch_size < 1:
        raise TiltgenError(f"--batch-size must be >= 1, got {batch_size}")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def prompts_digest(rows: Sequence[PromptRow]) -> str:
    """A fingerprint of the prompt list (texts, own seeds, negatives, fields), for the config check."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.text, row.seed, row.negative_prompt, row.fields], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---- the output folder ---------------------------------------------------------------------------
def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def prepare_output(out: Path, config: dict[str, Any], *, overwrite: bool = False) -> str:
    """Check ``out`` against ``config`` before any work: "fresh", "resume" (an unfinished run with
    the same settings) or "complete" (a finished one). Another run's settings are refused, with the
    differing keys named, unless ``overwrite`` (then its files are removed). Read-only unless
    ``overwrite``; call on every process, then :func:`start_output` on the main one."""
    work_config = out / WORK / "config.json"
    finished = out / "sample.json"
    old = None
    state = "fresh"
    if work_config.is_file():
        old, state = _read_json(work_config), "resume"
    elif finished.is_file():
        old = _read_json(finished).get("job")
        state = "complete" if old is not None else "fresh"
    if old is not None and old != config:
        if not overwrite:
            keys = differing_keys(old, config)
            raise TiltgenError(f"{out} holds another run's images, made with different settings ({', '.join(keys)}); "
                               "use another --out, or --overwrite to replace them")
        state = "fresh"
    return state


def start_output(out: Path, config: dict[str, Any], state: str) -> None:
    """Main process: clear a replaced run's files and record ``config`` for a resume."""
    if state == "fresh":
        shutil.rmtree(out / WORK, ignore_errors=True)
        for name in ("sample.json", "manifest.jsonl", "manifest.parquet"):
            (out / name).unlink(missing_ok=True)
    if state != "complete":
        (out / WORK).mkdir(parents=True, exist_ok=True)
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        write_json(out / WORK / "config.json", config)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TiltgenError(f"cannot read {path}: {error}; remove it or use another --out") from None


def finish_output(out: Path) -> None:
    """Main process, after the manifest is written: drop the resume bookkeeping."""
    shutil.rmtree(out / WORK, ignore_errors=True)


class Ledger:
    """Finished chunks: each process appends one JSON line per chunk to its own file."""

    def __init__(self, out: Path, rank: int):
        self.folder = out / WORK
        self.path = self.folder / f"ledger-{rank}.jsonl"
        self.checked_tail = False  # only this process appends here: a torn tail can only predate it

    def done(self) -> dict[int, list[dict[str, Any]]]:
        """Chunk index -> manifest rows, from every process's ledger (a torn last line is skipped)."""
        chunks: dict[int, list[dict[str, Any]]] = {}
        for path in sorted(self.folder.glob("ledger-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short: its chunk is redone
                chunks[int(entry["chunk"])] = entry["rows"]
        return chunks

    def record(self, chunk: int, rows: list[dict[str, Any]]) -> None:
        line = json.dumps({"chunk": chunk, "rows": rows}) + "\n"
        # a torn line from a kill would glue onto this one: start on a fresh line
        prefix = "" if self.checked_tail or not _torn_tail(self.path) else "\n"
        self.checked_tail = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(prefix + line)
            f.flush()
            os.fsync(f.fileno())


def _torn_tail(path: Path) -> bool:
    """Whether ``path`` exists, is not empty and does not end with a newline."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def save_png(path: Path, image: Any, upscale: int = 1) -> None:
    """An image [3, H, W] in [0, 1] as PNG, written atomically (optionally enlarged, nearest)."""
    import torch
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(arr)
    if upscale > 1:
        picture = picture.resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST)
    atomic_write(path, lambda p: picture.save(p, format="PNG"))


def write_manifest(out: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as manifest.parquet when pyarrow is installed, else manifest.jsonl (atomically)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = out / "manifest.jsonl"
        atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        (out / "manifest.parquet").unlink(missing_ok=True)
        return path
    path = out / "manifest.parquet"
    flat = [{**r, "fields": json.dumps(r.get("fields", {}))} for r in rows]
    atomic_write(path, lambda p: pq.write_table(pa.Table.from_pylist(flat), p))
    (out / "manifest.jsonl").unlink(missing_ok=True)
    return path


def read_manifest(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out``'s manifest (either format)."""
    if (out / "manifest.parquet").is_file():
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        return [{**r, "fields": json.loads(r["fields"])} for r in rows]
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line]


def remove_stale_images(out: Path, keep: set[str]) -> int:
    """Delete images in ``out/images`` that the manifest does not list (a replaced run's)."""
    removed = 0
    for path in (out / IMAGES).glob("*"):
        if f"{IMAGES}/{path.name}" not in keep and path.is_file():
            path.unlink()
            removed += 1
    return removed


# ---- the job -------------------------------------------------------------------------------------
@dataclass
class JobResult:
    rows: list[dict[str, Any]]
    resumed_images: int
    made_images: int
    timings: dict[str, float]


SampleFn = Callable[[list[ImageItem]], Any]  # chunk -> images [B, 3, H, W] in [0, 1]
ScoreFn = Callable[[Any, list[ImageItem]], tuple[list[float] | None, dict[str, list[float]]]]


def run_job(out: Path, items: list[ImageItem], *, batch_size: int, sample: SampleFn, score: ScoreFn,
            row_info: dict[str, Any], processes: Processes, upscale: int = 1, progress: bool = True) -> JobResult:
    """Make every image of ``items`` not already in the ledger (this process's chunks), then, on
    the main process, gather every process's rows in prompt/sample order."""
    chunks = chunked(items, batch_size)
    ledger = Ledger(out, processes.rank)
    done = ledger.done()
    processes.wait()  # every process has read the ledger before any adds to it
    todo = [k for k in processes.mine(list(range(len(chunks)))) if k not in done]
    resumed = sum(len(rows) for rows in done.values())
    timings = {"sample_s": 0.0, "score_s": 0.0, "png_s": 0.0, "ledger_s": 0.0}
    bar = _progress(sum(len(chunks[k]) for k in todo), processes, progress)
    made = 0
    for k in todo:
        chunk = chunks[k]
        start = time.perf_counter()
        images = sample(chunk)
        timings["sample_s"] += time.perf_counter() - start
        start = time.perf_counter()
        rewards, terms = score(images, chunk)
        timings["score_s"] += time.perf_counter() - start
        start = time.perf_counter()
        for i, item in enumerate(chunk):
            save_png(out / item.file, images[i], upscale)
        timings["png_s"] += time.perf_counter() - start
        start = time.perf_counter()
        rows = [manifest_row(item, row_info, None if rewards is None else rewards[i],
                             {name: values[i] for name, values in terms.items()}) for i, item in enumerate(chunk)]
        ledger.record(k, rows)
        timings["ledger_s"] += time.perf_counter() - start
        made += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    processes.wait()
    rows = [row for _, chunk_rows in sorted(ledger.done().items()) for row in chunk_rows]
    if processes.is_main and len(rows) != len(items):
        raise TiltgenError(f"only {len(rows)} of {len(items)} images were recorded; rerun the same command to finish")
    return JobResult(rows, resumed, made, timings)


def manifest_row(item: ImageItem, info: dict[str, Any], reward: float | None, terms: dict[str, float]) -> dict[str, Any]:
    row = {"image": item.file, "prompt": str(item.prompt), "prompt_index": item.prompt_index,
           "sample_index": item.sample_index, "seed": item.seed, "negative_prompt": item.negative_prompt,
           **info, "reward": reward, **terms}
    if item.prompt.fields:
        row["fields"] = item.prompt.fields
    return row


def _progress(total: int, processes: Processes, enabled: bool) -> Any:
    if not enabled or not processes.is_main or total == 0:
        return None
    from tqdm.auto import tqdm

    who = f" (process 1 of {processes.world_size})" if processes.distributed else ""
    return tqdm(total=total, desc=f"sampling{who}", unit="img", dynamic_ncols=True)
