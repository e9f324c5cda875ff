"""Where `pmod data prepare` reads the paper's data from, one resumable unit at a time.

- ``parquet_files(dir_or_file)`` / ``hub_parquet(repo, split)``: the LLaVA-NeXT-779K layout as
  ``lmms-lab/LLaVA-NeXT-Data`` publishes it: parquet shards with the columns ``id`` (string),
  ``conversations`` (list of ``{from, value}``), ``data_source`` (string) and ``image`` (an HF
  ``Image``: ``{bytes, path}``, null for a text-only sample). Read through ``datasets`` in
  streaming mode; one unit per shard. Each image is checked and written once into the output
  (``ImageStore``), and each row becomes a LLaVA sample pointing at it.
- ``llava_json(file, image_folder)``: a LLaVA JSON such as LLaVA-1.5's
  ``llava_v1_5_mix665k.json``, images under ``image_folder``. Units are runs of
  ``JSON_UNIT_SAMPLES`` samples; each sample is checked and kept unchanged, or dropped.

A unit's ``identity`` is what must be unchanged for its saved result to be reused by a later
run (the shard's name and size, the JSON file's size and time, the hub revision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cleaning import SampleProblem, check_image_bytes, check_image_file, conversation_problem

# imported where used: pyarrow, huggingface_hub and datasets (the train extra), per source kind

JSON_UNIT_SAMPLES = 10_000
# rows handed to the worker threads at once (bounds the image bytes held in memory)
ROWS_PER_BATCH = 256
NEXT_COLUMNS = ("id", "conversations", "image")
RESUME_HINT = "run the same command again to continue (finished shards are kept)"


def _file_mode() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    return 0o666 & ~umask


# what open() would give a new file (mkstemp's temporaries are private until renamed)
FILE_MODE = _file_mode()


@dataclass(frozen=True)
class Unit:
    index: int
    name: str  # in messages and the progress bar
    identity: dict[str, Any]
    rows: int | None  # None where unknown before reading (a hub shard)


@dataclass
class UnitResult:
    identity: dict[str, Any]
    rows: int
    records: list[dict[str, Any]] = field(default_factory=list)  # the kept samples, in order
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason", "detail"}


@dataclass
class Source:
    """One data set to prepare: its units and how to turn one into a ``UnitResult``."""

    kind: str  # "llava-next-parquet" or "llava-json"
    description: str
    fingerprint: dict[str, Any]  # what makes two outputs the same output
    units: list[Unit]
    total_rows: int | None
    # (unit, images, pool, advance) -> result; advance(n) moves the progress bar by n rows
    process: Callable[
        [Unit, ImageStore | None, ThreadPoolExecutor, Callable[[int], None]], UnitResult
    ]
    image_folder: Path | None = None  # where the output's image paths point; None: the output dir
    writes_images: bool = False


# ---- images ---------------------------------------------------------------------------------


class ImageStore:
    """Image files named by their content, ``images/3f/3fa9...c1.jpg`` under the output directory.

    Each is written to a temporary file and renamed, so a file under its final name is always
    whole; one already there (from an interrupted run, or the same picture in another sample)
    is not written again.
    """

    def __init__(self, root: Path, temporary: Path) -> None:
        self.root = root
        self.temporary = temporary

    def put(self, data: bytes, extension: str) -> str:
        digest = hashlib.sha256(data).hexdigest()[:32]
        relative = f"images/{digest[:2]}/{digest}.{extension}"
        final = self.root / relative
        try:
            if final.is_file() and final.stat().st_size == len(data):
                return relative
            final.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=digest, suffix=".part", dir=self.temporary)
            try:
                os.fchmod(handle, FILE_MODE)
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                os.replace(temporary, final)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as err:
            raise UserError(
                f"cannot write image {final}: {err.strerror or err}; {RESUME_HINT}"
            ) from None
        return relative


# ---- LLaVA-NeXT parquet ---------------------------------------------------------------------


def parquet_files(path: Path) -> Source:
    """The parquet shards in ``path`` (a directory, searched recursively, or one file)."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise UserError(
            f"{path} holds no .parquet files; expected LLaVA-NeXT-Data shards "
            "(data/train-00000-of-00250.parquet, ...) or a LLaVA JSON file"
        )
    base = path if path.is_dir() else path.parent
    units, total = [], 0
    for index, file in enumerate(files):
        try:  # the footer only: a truncated download fails here, before any work
            rows = pq.ParquetFile(file).metadata.num_rows
        except Exception as err:  # noqa: BLE001 - arrow's errors are not one type
            raise UserError(f"cannot read {file} as parquet ({err}); download it again") from None
        name = str(file.relative_to(base))
        units.append(Unit(index, name, {"file": name, "size": file.stat().st_size}, rows))
        total += rows

    def open_unit(unit: Unit):
        return _load_streaming("parquet", data_files=[str(base / unit.name)], split="train")

    return _parquet_source(
        f"{path} ({len(files)} parquet file{'s' * (len(files) != 1)})",
        {"source": str(path.resolve()), "files": [unit.name for unit in units]},
        units,
        total,
        open_unit,
    )


def hub_parquet(repo: str, split: str) -> Source:
    """The shards of a hub dataset in the LLaVA-NeXT-Data layout, streamed (no full download)."""
    revision = _hub_revision(repo)
    dataset = _load_streaming(repo, split=split, revision=revision, hub=repo)
    shards = dataset.num_shards
    units = [
        Unit(
            index,
            f"shard {index + 1}/{shards}",
            {"revision": revision, "shard": index, "shards": shards},
            None,
        )
        for index in range(shards)
    ]
    splits = dataset.info.splits or {}
    total = splits[split].num_examples if split in splits else None

    def open_unit(unit: Unit):
        return dataset.shard(num_shards=shards, index=unit.index)

    return _parquet_source(
        f"hub:{repo} ({split}, revision {revision[:10]})",
        {"source": f"hub:{repo}", "split": split},
        units,
        total,
        open_unit,
    )


def _hub_revision(repo: str) -> str:
    """The hub commit to read, pinned so that a resumed run reads the same shards."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.HfApi().dataset_info(repo).sha
    except errors.OfflineModeIsEnabled:
        raise UserError(
            f"cannot read {repo} from the Hugging Face Hub: HF_HUB_OFFLINE is set; unset it, or "
            "download the parquet files and pass their directory instead of --from-hub"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"the Hugging Face Hub has no dataset {repo} that you can read "
            "(check the name; a private or gated one needs `hf auth login`)"
        ) from None
    except Exception as err:  # noqa: BLE001 - no network shows as several libraries' errors
        raise UserError(
            f"cannot reach the Hugging Face Hub for {repo} ({err.__class__.__name__}: {err}); "
            "without network, download the parquet files elsewhere and pass their directory"
        ) from None


def _load_streaming(*args, hub: str | None = None, **kwargs):
    """``datasets.load_dataset(..., streaming=True)`` with the image column left as bytes."""
    import datasets

    try:
        dataset = datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - network, missing split, unreadable files
        where = f"{hub} from the Hugging Face Hub" if hub else f"{kwargs.get('data_files')}"
        raise UserError(
            f"cannot read {where} with `datasets` ({err.__class__.__name__}: {err})"
        ) from None
    features = dataset.features or {}
    if "conversations" not in features:
        raise UserError(
            f"{hub or kwargs.get('data_files')} has no 'conversations' column (it has: "
            f"{', '.join(features) or 'none'}); expected the LLaVA-NeXT-Data columns {', '.join(NEXT_COLUMNS)}"
        )
    if isinstance(features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """The hub client's retry warnings and datasets' notes are not pmod's to print: a failure,
    if any, becomes one error line."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub", "fsspec")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _parquet_source(description, fingerprint, units, total, open_unit) -> Source:
    def process(
        unit: Unit, images: ImageStore | None, pool: ThreadPoolExecutor, advance
    ) -> UnitResult:
        assert images is not None
        result = UnitResult(identity=unit.identity, rows=0)
        rows = _read_rows(open_unit(unit), unit)
        for batch in _batched(enumerate(rows), ROWS_PER_BATCH):
            converted = pool.map(lambda item: _convert_row(item[1], item[0], unit, images), batch)
            for record, dropped in converted:
                if record is not None:
                    result.records.append(record)
                else:
                    result.dropped.append(dropped)
            result.rows += len(batch)
            advance(len(batch))
        return result

    return Source(
        kind="llava-next-parquet",
        description=description,
        fingerprint={"format": "llava-next-parquet", **fingerprint},
        units=units,
        total_rows=total,
        process=process,
        writes_images=True,
    )


def _read_rows(dataset, unit: Unit) -> Iterator[dict[str, Any]]:
    iterator = iter(dataset)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - whatever breaks reading (arrow, fsspec, network)
            raise UserError(
                f"cannot read {unit.name} ({err.__class__.__name__}: {err}); {RESUME_HINT}"
            ) from None
        yield row


def _convert_row(row: dict[str, Any], position: int, unit: Unit, images: ImageStore):
    """(the LLaVA sample, None) or (None, why it is dropped)."""
    sample_id = str(row["id"]) if row.get("id") is not None else f"{unit.name}#{position}"
    try:
        data = _image_bytes(row.get("image"))
        problem = conversation_problem(row.get("conversations"), image_count=int(data is not None))
        if problem is not None:
            raise problem
        record: dict[str, Any] = {"id": sample_id}
        if data is not None:
            record["image"] = images.put(data, check_image_bytes(data))
        record["conversations"] = [
            {"from": m["from"], "value": m["value"]} for m in row["conversations"]
        ]
        if row.get("data_source") is not None:
            record["data_source"] = row["data_source"]
        return record, None
    except SampleProblem as problem:
        return None, {"id": sample_id, "reason": problem.reason, "detail": problem.detail}


def _image_bytes(image: Any) -> bytes | None:
    """The encoded image of a row; None for a text-only row."""
    if image is None:
        return None
    if isinstance(image, dict) and image.get("bytes"):
        return image["bytes"]
    path = image.get("path") if isinstance(image, dict) else None
    # an Image column may point at files instead; only an absolute path names one for sure (the
    # hub's rows carry a bare file name next to their bytes)
    if path and Path(path).is_absolute() and Path(path).is_file():
        return Path(path).read_bytes()
    raise SampleProblem(
        "missing_image", f"an image with no bytes{f' (path {path})' if path else ''}"
    )


# ---- LLaVA JSON -----------------------------------------------------------------------------


def llava_json(path: Path, image_folder: Path | None) -> Source:
    """A LLaVA JSON list of samples (llava_v1_5_mix665k.json), its images under ``image_folder``."""
    image_folder = image_folder if image_folder is not None else path.parent
    if not image_folder.is_dir():
        raise UserError(f"--image-folder {image_folder} is not a directory")
    items = _read_json_list(path)
    stat = path.stat()
    units = []
    for index, start in enumerate(range(0, len(items), JSON_UNIT_SAMPLES)):
        stop = min(start + JSON_UNIT_SAMPLES, len(items))
        identity = {
            "file": path.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "start": start,
            "stop": stop,
        }
        units.append(Unit(index, f"samples {start}-{stop - 1}", identity, stop - start))

    def process(unit: Unit, images, pool: ThreadPoolExecutor, advance) -> UnitResult:
        result = UnitResult(identity=unit.identity, rows=0)
        indices = range(unit.identity["start"], unit.identity["stop"])
        for batch in _batched(indices, ROWS_PER_BATCH):
            for index, problem in zip(
                batch,
                pool.map(lambda i: _json_sample_problem(items[i], image_folder), batch),
                strict=True,
            ):
                if problem is None:
                    result.records.append(items[index])
                else:
                    sample_id = (
                        items[index].get("id", f"#{index}")
                        if isinstance(items[index], dict)
                        else f"#{index}"
                    )
                    result.dropped.append(
                        {"id": str(sample_id), "reason": problem.reason, "detail": problem.detail}
                    )
            result.rows += len(batch)
            advance(len(batch))
        return result

    return Source(
        kind="llava-json",
        description=f"{path} (images in {image_folder})",
        fingerprint={
            "format": "llava-json",
            "source": str(path.resolve()),
            "image_folder": str(image_folder.resolve()),
        },
        units=units,
        total_rows=len(items),
        process=process,
        image_folder=image_folder.resolve(),
    )


def _read_json_list(path: Path) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as stream:
            items = json.load(stream)
    except json.JSONDecodeError as err:
        raise UserError(f"cannot parse {path} as JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(items, list):
        raise UserError(f"{path} must hold a JSON list of LLaVA samples")
    return items


def _json_sample_problem(item: Any, image_folder: Path) -> SampleProblem | None:
    if not isinstance(item, dict):
        return SampleProblem("malformed", "not a JSON object")
    images = item.get("image")
    if images in (None, "", []):
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not (isinstance(images, list) and all(isinstance(image, str) for image in images)):
        return SampleProblem(
            "bad_image_field", f"'image' is a {type(images).__name__}: {str(images)[:60]}"
        )
    problem = conversation_problem(item.get("conversations"), image_count=len(images))
    if problem is not None:
        return problem
    try:
        for image in images:
            check_image_file(Path(image) if Path(image).is_absolute() else image_folder / image)
    except SampleProblem as problem:
        return problem
    return None


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
