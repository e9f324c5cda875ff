"""`pmod data prepare`: the paper's training data, turned into what `pmod sft` reads.

    result = prepare_data(Path("LLaVA-NeXT-Data/data"), Path("data/next779k"))
    result.data_path, result.image_folder     # data.path and data.image_folder of a recipe

Sources (``prepare_sources``): the LLaVA-NeXT-779K parquet shards (a local directory, or the
hub through ``datasets``), whose images are written out once; or a LLaVA JSON such as the
665K mix, whose images stay where they are. Every sample goes through the same checks
(``cleaning``); the dropped ones are counted per reason and listed.

The output directory:

    data.json      the LLaVA JSON                    -> data.path
    images/        the parquet's images, named by content (data.image_folder: the directory)
    dropped.jsonl  one line per dropped sample: id, reason, detail
    prepare.json   what was prepared from what, and the counts
    .prepare/      only while unfinished: state, one result file per finished unit, temporaries

Resuming: a run that stops (killed, a read error, no space) leaves ``.prepare/``; the same
command continues from it, reusing each finished unit and every image already written. Nothing
is half-written: images, unit results and the final files are written to temporaries and
renamed, and ``data.json`` appears last, when every unit is done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cleaning import REASONS, strict_image_decoding
from .prepare_sources import (
    FILE_MODE,
    ImageStore,
    Source,
    Unit,
    UnitResult,
    hub_parquet,
    llava_json,
    parquet_files,
    quiet_libraries,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_FILE = "data.json"
DROPPED_FILE = "dropped.jsonl"
MANIFEST_FILE = "prepare.json"
IMAGES_DIR = "images"
STATE_DIR = ".prepare"


@dataclass
class PrepareResult:
    output: str
    format: str  # "llava-next-parquet" or "llava-json"
    source: str
    data_path: str  # -> data.path
    image_folder: str  # -> data.image_folder
    total: int  # samples read
    kept: int
    text_only: int  # of the kept
    images: int  # distinct image files the kept samples use (parquet sources: written here)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, REASONS order
    first_dropped: dict[str, str] = field(default_factory=dict)  # reason -> "id: detail"
    units: int = 0
    reused_units: int = 0  # finished by an earlier, interrupted run
    already_prepared: bool = False  # nothing to do: this output was finished before


def open_source(
    source: Path | None, from_hub: str | None, split: str, image_folder: Path | None
) -> Source:
    """The ``Source`` for a local directory / file, or a hub dataset."""
    if (source is None) == (from_hub is None):
        raise UserError(
            "give either a SOURCE (a directory or file) or --from-hub REPO, not both or neither"
        )
    if from_hub is not None:
        if image_folder is not None:
            raise UserError(
                "--image-folder is for a LLaVA JSON source; a hub dataset brings its images"
            )
        return hub_parquet(from_hub, split)
    source = Path(source)
    if not source.exists():
        raise UserError(
            f"{source} does not exist; give the LLaVA-NeXT-Data parquet directory or a LLaVA JSON file"
        )
    if source.is_file() and source.suffix == ".json":
        return llava_json(source, image_folder)
    if source.is_dir() or source.suffix == ".parquet":
        if image_folder is not None:
            raise UserError(
                "--image-folder is for a LLaVA JSON source; parquet shards hold their images"
            )
        return parquet_files(source)
    raise UserError(
        f"{source} is neither a directory of parquet shards, a .parquet file nor a .json file"
    )


def prepare_data(
    source: Path | None,
    output: Path,
    *,
    from_hub: str | None = None,
    split: str = "train",
    image_folder: Path | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Prepare ``source`` (or the hub dataset ``from_hub``) into the directory ``output``."""
    output = Path(output).absolute()
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    with ExitStack() as stack:
        stack.enter_context(quiet_libraries())
        stack.enter_context(strict_image_decoding())
        data = open_source(source, from_hub, split, Path(image_folder) if image_folder else None)
        stack.enter_context(_locked(output))
        finished = _claim_output(output, data.fingerprint, overwrite)
        if finished is not None:
            return finished
        reused = _run_units(data, output, workers, progress)
        return _finish(data, output, reused)


# ---- the output directory -------------------------------------------------------------------


@contextmanager
def _locked(output: Path) -> Iterator[None]:
    """Create ``output`` if needed and hold a lock on it: two runs never write one directory."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output {output}: {err.strerror or err}") from None
    descriptor = os.open(output, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `pmod data prepare` is writing {output}; wait for it to finish"
            ) from None
        except (ImportError, OSError):  # no locks here: the rename protocol alone
            pass
        yield
    finally:
        os.close(descriptor)


def _claim_output(output: Path, fingerprint: dict, overwrite: bool) -> PrepareResult | None:
    """Decide what to do with what ``output`` holds; the earlier result if it is already done."""
    state_file = output / STATE_DIR / "state.json"
    manifest_file = output / MANIFEST_FILE
    state = _read_json(state_file) or None
    if state is None and (output / STATE_DIR).exists():  # killed before its state was written
        shutil.rmtree(output / STATE_DIR)
    manifest = _read_json(manifest_file) if manifest_file.exists() else None
    if state is not None and state.get("fingerprint") == fingerprint:
        if not overwrite:
            return None  # an interrupted run of this same preparation: continue it
    elif state is not None and not overwrite:
        raise UserError(
            f"{output} holds an unfinished preparation of {_named(state)}; run that command again to "
            "finish it, pass --overwrite to replace it, or choose another --output"
        )
    elif state is None and manifest is not None:
        if manifest.get("fingerprint") == fingerprint and not overwrite:
            fields = {
                name: manifest[name]
                for name in PrepareResult.__dataclass_fields__
                if name in manifest
            }
            # where it is now, should the directory have been moved since
            fields.update(
                output=str(output), data_path=str(output / DATA_FILE), already_prepared=True
            )
            if fields.get("format") == "llava-next-parquet":
                fields["image_folder"] = str(output)
            return PrepareResult(**fields)
        if not overwrite:
            raise UserError(
                f"{output} already holds data prepared from {_named(manifest)}; pass --overwrite to "
                "replace it, or choose another --output"
            )
    elif state is None and any(output.iterdir()):
        raise UserError(
            f"{output} is not empty and holds no `pmod data prepare` output; choose a new or empty --output"
        )
    # a fresh start (replacing an earlier output: its images no longer used are removed at the end)
    shutil.rmtree(output / STATE_DIR, ignore_errors=True)
    replacing = state is not None or manifest is not None
    _write_json_atomically(
        state_file,
        {"version": FORMAT_VERSION, "fingerprint": fingerprint, "prune_images": replacing},
    )
    return None


def _named(saved: dict) -> str:
    fingerprint = saved.get("fingerprint") or {}
    return str(fingerprint.get("source", "another source"))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a state file from a crash, or not ours: start over
        return {}
    return value if isinstance(value, dict) else {}


def _write_json_atomically(path: Path, value: Any) -> None:
    with _atomic_file(path) as stream:
        json.dump(value, stream, ensure_ascii=False)


@contextmanager
def _atomic_file(path: Path, temporary_dir: Path | None = None) -> Iterator[Any]:
    """A text stream whose content replaces ``path`` at once on success; on failure ``path`` is untouched."""
    temporary_dir = temporary_dir or path.parent
    try:
        temporary_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f"{path.name}.", suffix=".part", dir=temporary_dir
        )
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        os.fchmod(handle, FILE_MODE)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err.strerror or err}") from None
        raise


# ---- running the units ----------------------------------------------------------------------


def _run_units(data: Source, output: Path, workers: int, progress: bool) -> int:
    """Process every unit not finished yet; the number reused from an earlier run."""
    state = output / STATE_DIR
    temporary = state / "tmp"
    shutil.rmtree(temporary, ignore_errors=True)  # the leftovers of a killed run
    temporary.mkdir(parents=True)
    images = ImageStore(output, temporary) if data.writes_images else None
    reused = 0
    with ThreadPoolExecutor(workers) as pool, _progress_bar(data.total_rows, progress) as bar:
        for unit in data.units:
            bar.describe(unit.name)
            saved = _saved_result(state, unit)
            if saved is not None:
                reused += 1
                bar.advance(saved.rows)
                continue
            result = data.process(unit, images, pool, bar.advance)
            _write_json_atomically(_unit_file(state, unit), asdict(result))
    return reused


def _unit_file(state: Path, unit: Unit) -> Path:
    return state / "units" / f"{unit.index:05d}.json"


def _saved_result(state: Path, unit: Unit) -> UnitResult | None:
    saved = _read_json(_unit_file(state, unit))
    if saved.get("identity") != unit.identity:  # none, or made from a file since changed
        return None
    return UnitResult(**saved)


class _Bar:
    def __init__(self, progress=None, task=None) -> None:
        self.progress, self.task = progress, task

    def advance(self, rows: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, rows)

    def describe(self, name: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=name)


@contextmanager
def _progress_bar(total: int | None, enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar()
        return
    from ..progress import progress_bar

    # on stderr, gone when done: stdout holds only the report (or --json)
    with progress_bar() as progress:
        yield _Bar(progress, progress.add_task("preparing", total=total))


# ---- finishing ------------------------------------------------------------------------------


def _finish(data: Source, output: Path, reused: int) -> PrepareResult:
    """Write dropped.jsonl, data.json (last) and prepare.json from the unit results; tidy up."""
    state = output / STATE_DIR
    counts = _write_samples(data, output, state)
    dropped, first_dropped = counts.dropped, counts.first_dropped
    # absolute paths: a recipe may be run from another directory
    result = PrepareResult(
        output=str(output),
        format=data.kind,
        source=data.description,
        data_path=str(output / DATA_FILE),
        image_folder=str(data.image_folder or output),
        total=counts.total,
        kept=counts.kept,
        text_only=counts.text_only,
        images=len(counts.images),
        dropped={reason: dropped[reason] for reason in REASONS if dropped[reason]},
        first_dropped={
            reason: first_dropped[reason] for reason in REASONS if reason in first_dropped
        },
        units=len(data.units),
        reused_units=reused,
    )
    _write_json_atomically(
        output / MANIFEST_FILE,
        {"version": FORMAT_VERSION, "fingerprint": data.fingerprint, **asdict(result)},
    )
    if _read_json(state / "state.json").get("prune_images"):
        _remove_unused_images(output, counts.images if data.writes_images else set())
    shutil.rmtree(state, ignore_errors=True)
    if counts.total and not counts.kept:
        reason = max(dropped, key=dropped.get)
        logger.warning(
            "none of the %d samples was kept (most: %s, e.g. %s)",
            counts.total,
            reason,
            first_dropped[reason],
        )
    return result


@dataclass
class _Counts:
    """What the written files hold: samples read, kept, kept without an image; images used;
    samples dropped per reason, and the first of each."""

    total: int = 0
    kept: int = 0
    text_only: int = 0
    images: set[str] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)
    first_dropped: dict[str, str] = field(default_factory=dict)


def _write_samples(data: Source, output: Path, state: Path) -> _Counts:
    """data.json (the kept samples) and dropped.jsonl, in unit order, each written atomically."""
    temporary = state / "tmp"
    counts = _Counts()
    with (
        _atomic_file(output / DATA_FILE, temporary) as data_stream,
        _atomic_file(output / DROPPED_FILE, temporary) as dropped_stream,
    ):
        data_stream.write("[")
        for unit in data.units:
            result = _saved_result(state, unit)
            assert result is not None, f"{unit.name} has no result"
            counts.total += result.rows
            for record in result.records:
                data_stream.write(",\n" if counts.kept else "\n")
                data_stream.write(json.dumps(record, ensure_ascii=False))
                counts.kept += 1
                paths = _image_paths(record)
                counts.text_only += not paths
                counts.images.update(paths)
            for sample in result.dropped:
                dropped_stream.write(json.dumps(sample, ensure_ascii=False) + "\n")
                counts.dropped[sample["reason"]] += 1
                counts.first_dropped.setdefault(
                    sample["reason"], f"{sample['id']}: {sample['detail']}"
                )
        data_stream.write("\n]\n")
    return counts


def _image_paths(record: dict[str, Any]) -> list[str]:
    images = record.get("image")
    if not images:
        return []
    return [images] if isinstance(images, str) else list(images)


def _remove_unused_images(output: Path, used: set[str]) -> None:
    """After --overwrite: the replaced output's images that the new one does not use."""
    folder = output / IMAGES_DIR
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        if path.is_file() and path.relative_to(output).as_posix() not in used:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


# ---- reporting ------------------------------------------------------------------------------


def result_to_json(result: PrepareResult) -> dict[str, Any]:
    return asdict(result)


def print_report(result: PrepareResult, console=None) -> None:
    """The counts as a table, then the two recipe keys that point `pmod sft` at the output."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"{result.format}: {result.source}"
    if result.already_prepared:
        title += " (already prepared; nothing to do)"
    table = Table(title=title, title_justify="left")
    table.add_column("samples")
    table.add_column("count", justify="right")
    table.add_column("first one", overflow="fold")
    table.add_row("read", str(result.total), "")
    table.add_row(
        "kept", str(result.kept), f"{result.text_only} text-only; image files: {result.images}"
    )
    for reason, count in result.dropped.items():
        table.add_row(f"dropped: {reason}", str(count), result.first_dropped.get(reason, ""))
    console.print(table)
    if result.reused_units:
        console.print(
            f"continued an interrupted run: {result.reused_units} of {result.units} units were already done"
        )
    console.print(f"dropped samples are listed in {Path(result.output) / DROPPED_FILE}")
    console.print("for a recipe:")
    console.print(f'  data.path = "{result.data_path}"', highlight=False, markup=False)
    console.print(f'  data.image_folder = "{result.image_folder}"', highlight=False, markup=False)
