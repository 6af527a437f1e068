"""The driver of ``sd-engine render``: plan, resume, batch, run, record, review.

One driver per OUT_DIR (a lock file refuses a second). It plans the jobs file into work items, stores
the random seeds it drew before any image uses them, skips what the ledger shows done, copies instead of
rendering an image another item already made (equal key), groups the rest into UNet batches of
compatible items, hands them to a runner (worker processes or Ray) and writes the ledger as results
arrive. At the end it writes the contact sheets and ``index.html`` for every finished image of the plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.batch.items import EngineIdentity, WorkItem
from engine.batch.jobs import Matrix, Plan, plan_jobs
from engine.batch.ledger import (
    ErrorLog,
    Ledger,
    LedgerEntry,
    file_sha256,
    read_seeds,
    remove_temporaries,
    render_lock,
    write_seeds,
)
from engine.batch.runner import RenderSettings, Runner
from engine.batch.worker import KEY_CHUNK, ItemResult
from engine.errors import EngineError
from engine.fsutil import write_atomic
from engine.manifest import read_manifest

log = logging.getLogger(__name__)

DEFAULT_BATCH = 4
UNSHARED = "OUT_DIR must be one folder that every worker (every Ray node) sees at the same path"
_BATCH_FIELDS = ("width", "height", "steps", "sampler", "guidance_scale", "guidance_rescale", "clip_skip")


@dataclass(frozen=True)
class RenderJob:
    """One ``sd-engine render``: the jobs file, the matrix flags, how to run, images per UNet batch
    (``batch`` 1: batching off) and whether the first failure stops the render."""

    jobs: Path
    settings: RenderSettings
    matrix: Matrix = field(default_factory=Matrix)
    batch: int = DEFAULT_BATCH
    fail_fast: bool = False
    review: bool = True


@dataclass(frozen=True)
class RenderSummary:
    """What a render did. ``planned``: images the jobs file asks for; ``skipped``: found done;
    ``copied``: made by copying an equal image; ``failed``: items that failed to render; ``bad_rows``:
    rows refused while planning; ``seconds``: the rendering phase (model loads included)."""

    planned: int
    skipped: int = 0
    copied: int = 0
    rendered: int = 0
    failed: int = 0
    bad_rows: int = 0
    seconds: float = 0.0
    stopped: bool = False  # --fail-fast ended the render early

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.bad_rows == 0 and not self.stopped

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.rendered / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = f", {self.images_per_minute:.1f} images/min" if self.rendered else ""
        stopped = " (stopped by --fail-fast)" if self.stopped else ""
        return (
            f"{self.planned} images planned: {self.rendered} rendered in {self.seconds:.1f} s{rate}, "
            f"{self.skipped} already done, {self.copied} copied, {self.failed} failed, "
            f"{self.bad_rows} bad rows{stopped}"
        )


class _FailFast(Exception):
    """Raised from the result callback to stop the runner at the first failure."""


ProgressHook = Callable[[int, int], None]  # (images finished, images failed) since the last call


def render(job: RenderJob, progress: Callable[[int], ProgressHook] | None = None) -> RenderSummary:
    """Run a render (resuming whatever an earlier run of the same OUT_DIR finished).

    ``progress(total)`` returns a hook called as images finish. Raises EngineError (one line) for a
    fatal problem: an unreadable jobs file, an engine folder that cannot load, OUT_DIR in use.
    """
    if job.batch < 1:
        raise EngineError(f"--batch must be at least 1, got {job.batch}")
    out_dir = job.settings.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise EngineError(f"OUT_DIR {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    with render_lock(out_dir):
        remove_temporaries(out_dir)
        plan = _plan(job)
        errors = ErrorLog(out_dir, [error.to_json() for error in plan.errors])
        with Ledger(out_dir) as ledger:  # one ledger: each PNG is hashed at most once per run
            try:
                summary = RenderSummary(len(plan.items), bad_rows=len(plan.errors))
                if job.fail_fast and plan.errors:
                    summary = replace(summary, stopped=True)
                else:
                    summary = _render_plan(job, plan, ledger, errors, summary, progress)
            finally:
                errors.close()
            if job.review:
                write_review(ledger, plan.items)
    return summary


@dataclass(frozen=True)
class Preview:
    """What a render would do (``--dry-run``): images planned, found done, to copy from an equal
    finished image, to render, and the bad rows (RowError values, with their lines)."""

    planned: int
    done: int
    copies: int
    to_render: int
    bad_rows: tuple[Any, ...]

    def line(self) -> str:
        return (
            f"dry run: {self.planned} images planned: {self.to_render} to render, {self.done} already "
            f"done, {self.copies} to copy, {len(self.bad_rows)} bad rows"
        )


def preview(job: RenderJob) -> Preview:
    """Plan the render and compare it with OUT_DIR, writing nothing (no seeds stored, no ledger
    created or repaired). Raises what :func:`render` raises for an unusable jobs file or engine."""
    out_dir = job.settings.out_dir
    identity = EngineIdentity.of(
        read_manifest(job.settings.engine_dir), job.settings.backend, job.settings.lora_dir
    )
    present = out_dir.is_dir()
    plan = plan_jobs(job.jobs, job.matrix, identity, read_seeds(out_dir) if present else {})
    done = copies = 0
    todo = list(plan.items)
    if present:
        with Ledger(out_dir, writable=False) as ledger:
            rest = [i for i in plan.items if not ledger.done(i) and png_key(out_dir / i.file) != i.key]
            todo = [item for item in rest if ledger.source_of(item) is None]
            done, copies = len(plan.items) - len(rest), len(rest) - len(todo)
    first, repeats = split_repeats(todo)
    copies += sum(len(items) for items in repeats.values())
    return Preview(len(plan.items), done, copies, len(first), plan.errors)


def _plan(job: RenderJob) -> Plan:
    """The work items, with the random seeds stored before any image uses them."""
    out_dir = job.settings.out_dir
    identity = EngineIdentity.of(
        read_manifest(job.settings.engine_dir), job.settings.backend, job.settings.lora_dir
    )
    stored = read_seeds(out_dir)
    plan = plan_jobs(job.jobs, job.matrix, identity, stored)
    if plan.seeds != stored:
        write_seeds(out_dir, {**stored, **plan.seeds})
    return plan


def _render_plan(
    job: RenderJob,
    plan: Plan,
    ledger: Ledger,
    errors: ErrorLog,
    summary: RenderSummary,
    progress: Callable[[int], ProgressHook] | None,
) -> RenderSummary:
    out_dir = job.settings.out_dir
    todo, skipped, copied = sort_out(plan.items, ledger, out_dir)
    first, repeats = split_repeats(todo)
    hook = progress(len(plan.items)) if progress else None
    if hook:
        hook(skipped + copied, 0)
    recorder = _Recorder(ledger, errors, first, repeats, hook, job.fail_fast)
    start = time.perf_counter()
    stopped = False
    if first:
        try:
            make_runner(job.settings).run(make_batches(first, job.batch), recorder)
        except _FailFast:
            stopped = True
    seconds = time.perf_counter() - start
    return replace(
        summary,
        skipped=skipped,
        copied=copied + recorder.copied,
        rendered=recorder.rendered,
        failed=recorder.failed,
        seconds=seconds,
        stopped=stopped,
    )


class _Recorder:
    """The runners' result callback: ledger lines (and copies for equal items) for finished images,
    errors.jsonl lines for failed ones, progress, and --fail-fast."""

    def __init__(
        self,
        ledger: Ledger,
        errors: ErrorLog,
        items: Sequence[WorkItem],
        repeats: dict[str, list[WorkItem]],
        hook: ProgressHook | None,
        fail_fast: bool,
    ) -> None:
        self.ledger, self.errors, self.repeats, self.hook = ledger, errors, repeats, hook
        self.items = {item.key: item for item in items}
        self.fail_fast = fail_fast
        self.rendered = self.copied = self.failed = 0

    def __call__(self, result: ItemResult) -> None:
        item = self.items[result.key]
        repeats = self.repeats.get(item.key, [])
        if result.ok and not (self.ledger.out_dir / item.file).is_file():
            unseen = f"the worker wrote {item.file} but the driver cannot see it: {UNSHARED}"
            result = replace(result, error=unseen)
        if result.ok and result.sha256:
            entry = LedgerEntry(item.key, item.file, result.sha256, result.timings, item.row, item.image)
            self.ledger.append(entry)
            self.copied += copy_repeats(self.ledger, item, repeats, self.ledger.out_dir)
            self.rendered += 1
        else:
            for failed in (item, *repeats):
                self.errors.append(_item_error(failed, result.error or "no image"))
            self.failed += 1 + len(repeats)
        if self.hook:
            done = 1 + len(repeats)
            self.hook(done if result.ok else 0, 0 if result.ok else done)
        if self.fail_fast and not result.ok:
            raise _FailFast


def sort_out(items: Sequence[WorkItem], ledger: Ledger, out_dir: Path) -> tuple[list[WorkItem], int, int]:
    """(items to render, how many are done (a finished PNG a crash kept out of the ledger included), how
    many were made by copying an equal finished PNG)."""
    todo, skipped, copied = [], 0, 0
    for item in items:
        if ledger.done(item) or adopt(ledger, item, out_dir):
            skipped += 1
        elif copy_from_ledger(ledger, item, out_dir):
            copied += 1
        else:
            todo.append(item)
    return todo, skipped, copied


def adopt(ledger: Ledger, item: WorkItem, out_dir: Path) -> bool:
    """A finished PNG whose ledger line a kill -9 prevented: its key chunk names the item."""
    path = out_dir / item.file
    if not path.is_file() or png_key(path) != item.key:
        return False
    ledger.append(LedgerEntry(item.key, item.file, file_sha256(path), {}, item.row, item.image))
    return True


def png_key(path: Path) -> str | None:
    """The item key a finished PNG carries (None: not ours, or unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            key = image.text.get(KEY_CHUNK) if hasattr(image, "text") else None
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return key if isinstance(key, str) else None


def copy_from_ledger(ledger: Ledger, item: WorkItem, out_dir: Path) -> bool:
    """An equal image (same key) finished under another name: copy it, do not render it again."""
    source = ledger.source_of(item)
    if source is None:
        return False
    write_atomic(out_dir / item.file, (out_dir / source.file).read_bytes())
    ledger.append(LedgerEntry(item.key, item.file, source.sha256, {}, item.row, item.image))
    return True


def copy_repeats(ledger: Ledger, item: WorkItem, repeats: Sequence[WorkItem], out_dir: Path) -> int:
    """After ``item`` rendered: its equal items in this plan get copies of its PNG."""
    for repeat in repeats:
        copy_from_ledger(ledger, repeat, out_dir)
    return len(repeats)


def split_repeats(items: Sequence[WorkItem]) -> tuple[list[WorkItem], dict[str, list[WorkItem]]]:
    """(the first item of each key, the later items with that key): equal images render once."""
    first: dict[str, WorkItem] = {}
    repeats: dict[str, list[WorkItem]] = {}
    for item in items:
        if item.key in first:
            repeats.setdefault(item.key, []).append(item)
        else:
            first[item.key] = item
    return list(first.values()), repeats


def batch_key(item: WorkItem) -> tuple[Any, ...]:
    """Items with equal keys can share one UNet batch (GenerationRequest.batch_key's fields)."""
    settings = item.settings
    return tuple(settings[name] for name in _BATCH_FIELDS)


def make_batches(items: Iterable[WorkItem], size: int) -> list[list[WorkItem]]:
    """Compatible items in batches of at most ``size``, in the order their first item appears."""
    open_batches: dict[tuple[Any, ...], list[WorkItem]] = {}
    batches: list[list[WorkItem]] = []
    for item in items:
        batch = open_batches.setdefault(batch_key(item), [])
        if not batch:
            batches.append(batch)
        batch.append(item)
        if len(batch) == size:
            del open_batches[batch_key(item)]
    return batches


def make_runner(settings: RenderSettings) -> Runner:
    if settings.ray_address is not None:
        from engine.batch.ray_runner import RayRunner

        return RayRunner(settings)
    from engine.batch.local import LocalRunner

    return LocalRunner(settings)


def _item_error(item: WorkItem, error: str) -> dict[str, Any]:
    return {"line": item.line, "row": item.row, "image": item.image, "file": item.file, "error": error}


def write_review(ledger: Ledger, items: Sequence[WorkItem]) -> None:
    """Contact sheets and index.html in the ledger's folder for every finished image of the plan (in
    plan order)."""
    from engine.batch.review import GalleryEntry, write_contact_sheets, write_gallery

    finished = [item for item in items if ledger.done(item)]
    entries = [GalleryEntry.from_request(i.file, i.row, i.image, i.settings) for i in finished]
    write_contact_sheets(ledger.out_dir, entries)
    write_gallery(ledger.out_dir, entries)
