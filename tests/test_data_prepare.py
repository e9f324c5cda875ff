"""`pmod data prepare`: the LLaVA-NeXT parquet layout and the 665K-mix JSON into what `pmod sft`
reads; counts per reason, resuming after a kill or a failed write, output guards, offline hub."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pmod_cli import cli
from pmod_cli.data import prepare_sources
from pmod_cli.data.llava_data import load_records, scan_records
from pmod_cli.data.prepare import prepare_data

# one worker builds the converted LLaVA-NeXT set (next_prepared) once
pytestmark = pytest.mark.xdist_group("data_prepare")

ROOT = Path(__file__).resolve().parents[1]

# the columns lmms-lab/LLaVA-NeXT-Data publishes (its dataset card's dataset_info)
NEXT_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        "data_source": datasets.Value("string"),
        "image": datasets.Image(),
    }
)


def encoded(color, size=(24, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_jpeg(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(noise_png(side, seed))).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def chat(question="<image>\nWhat is shown?", answer="A shape."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def row(sample_id, conversations, image=None):
    return {"id": sample_id, "conversations": conversations, "data_source": "test", "image": image}


def image_of(data: bytes):
    return {"bytes": data, "path": None}


RED, GREEN = encoded((255, 0, 0)), encoded((0, 160, 0), fmt="JPEG")
BIG = noise_png(300, seed=0)  # ~270 KB: over the file-size limit of the interrupted run
# the expected outcome of every row below: kept, or the reason it is dropped
NEXT_SHARDS = [
    [
        (row("n0", chat(), image_of(RED)), "kept"),
        (row("n1", chat(), image_of(GREEN)), "kept"),
        (row("n2", chat("Say hi."), None), "kept"),  # text-only
        (row("n3", chat("<image>\nAgain?"), image_of(RED)), "kept"),  # the same picture: one file
        (row("n4", [{"from": "gpt", "value": "Hello."}], image_of(RED)), "no_reply"),
        (row("n5", chat(), image_of(b"\x89PNG not really")), "unreadable_image"),
    ],
    [
        (row("n6", chat(), image_of(encoded((0, 0, 255)))), "kept"),
        (
            row("n7", chat("No placeholder here."), image_of(encoded((9, 9, 9)))),
            "image_count_mismatch",
        ),
        (row("n8", chat("<image>\nBut no image."), None), "image_count_mismatch"),
        (
            row(
                "n9",
                [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}],
                image_of(RED),
            ),
            "non_string_value",
        ),
        (row("n10", chat(), {"bytes": None, "path": "not/shipped.jpg"}), "missing_image"),
        (
            row(
                "n11",
                [{"from": "human", "value": "<image>"}, {"from": "robot", "value": "x"}],
                image_of(RED),
            ),
            "wrong_roles",
        ),
    ],
    [
        (row("n12", chat(), image_of(encoded((50, 50, 50)))), "kept"),
        (row("n13", chat(), image_of(BIG)), "kept"),
        (row("n14", chat(), image_of(encoded((70, 70, 70), fmt="JPEG"))), "kept"),
    ],
    [(row(f"n{15 + i}", chat(), image_of(noise_png(48, seed=i + 1))), "kept") for i in range(8)],
]


def write_next_shards(directory: Path) -> Path:
    data = directory / "data"
    data.mkdir(parents=True)
    for index, shard in enumerate(NEXT_SHARDS):
        columns = {name: [sample[name] for sample, _ in shard] for name in NEXT_FEATURES}
        table = datasets.Dataset.from_dict(
            columns, features=NEXT_FEATURES
        ).data.table  # with the HF schema
        # as Dataset.to_parquet writes it, without embedding the missing file of row n10
        pq.write_table(table, data / f"train-{index:05d}-of-{len(NEXT_SHARDS):05d}.parquet")
    return directory


def expected(shards) -> tuple[list[str], dict[str, str]]:
    kept = [sample["id"] for shard in shards for sample, outcome in shard if outcome == "kept"]
    dropped = {
        sample["id"]: outcome for shard in shards for sample, outcome in shard if outcome != "kept"
    }
    return kept, dropped


def run_prepare(*args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pmod_cli", "data", "prepare", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, **popen
    )


def run_cli(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["pmod", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code or 0, capsys.readouterr()


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def whole_images(output: Path) -> dict[str, tuple[int, int]]:
    """Every image file (asserting each is whole: its content hashes to its name) -> (inode, mtime)."""
    files = {}
    for path in sorted((output / "images").rglob("*.*")):
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:32] == path.stem, (
            f"{path} is not whole"
        )
        files[path.relative_to(output).as_posix()] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def next_source(tmp_path_factory) -> Path:
    return write_next_shards(tmp_path_factory.mktemp("next")) / "data"


@pytest.fixture(scope="module")
def next_prepared(next_source, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of the real CLI: the reference the other runs are compared with."""
    output = tmp_path_factory.mktemp("next_out") / "prepared"
    result = run_prepare(str(next_source), "-o", str(output), "--json")
    assert result.returncode == 0, result.stderr
    return output, json.loads(result.stdout)


# ---- the LLaVA-NeXT parquet layout ----------------------------------------------------------


@pytest.mark.slow
def test_next_parquet_becomes_images_and_one_llava_json(next_prepared):
    output, report = next_prepared
    kept, dropped = expected(NEXT_SHARDS)
    assert report["format"] == "llava-next-parquet" and report["total"] == sum(
        map(len, NEXT_SHARDS)
    )
    assert report["kept"] == len(kept) and report["text_only"] == 1
    assert report["dropped"] == {
        "non_string_value": 1,
        "wrong_roles": 1,
        "no_reply": 1,
        "image_count_mismatch": 2,
        "missing_image": 1,
        "unreadable_image": 1,
    }
    assert report["data_path"] == str(output / "data.json") and report["image_folder"] == str(
        output
    )

    records = json.loads((output / "data.json").read_text())
    assert [record["id"] for record in records] == kept
    listed = [json.loads(line) for line in (output / "dropped.jsonl").read_text().splitlines()]
    assert {sample["id"]: sample["reason"] for sample in listed} == dropped

    # each image is the row's own bytes, written once: n0 and n3 share one file
    sources = {sample["id"]: sample["image"] for shard in NEXT_SHARDS for sample, _ in shard}
    by_id = {record["id"]: record for record in records}
    for sample_id, record in by_id.items():
        if "image" in record:
            assert (output / record["image"]).read_bytes() == sources[sample_id]["bytes"]
    assert by_id["n0"]["image"] == by_id["n3"]["image"] and by_id["n1"]["image"].endswith(".jpg")
    assert len(whole_images(output)) == report["images"] == len(kept) - 2  # text-only, duplicate
    assert by_id["n0"]["conversations"] == chat() and by_id["n0"]["data_source"] == "test"
    assert not (output / ".prepare").exists()

    # the training reader takes every sample as it is
    loaded = load_records(output / "data.json")
    scan = scan_records(loaded, report["image_folder"], max_bad_fraction=0.0)
    assert len(scan.valid) == len(kept) and not scan.bad and scan.text_only == 1


@pytest.mark.slow
def test_prepared_data_passes_sft_dry_run(next_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    mix = write_mix665k(tmp_path)
    mix_out = tmp_path / "mix_out"
    code, _ = run_cli(
        monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(mix_out), "--json"
    )
    assert code == 0
    next_out, report = next_prepared
    for data, image_folder, usable, text_only in [
        (next_out / "data.json", next_out, report["kept"], 1),
        (mix_out / "data.json", mix.parent, len(expected_mix()[0]), 1),
    ]:
        code, captured = run_cli(
            monkeypatch,
            capsys,
            "sft",
            "recipes/tiny.toml",
            "--dry-run",
            "--set",
            f"data.path={data}",
            "--set",
            f"data.image_folder={image_folder}",
            # a fresh connector: the recipe's runs/tiny/pretrain exists only where it was made
            "--set",
            "model.pretrained_connector=",
        )
        out = " ".join(captured.out.split())
        assert code == 0, captured.err
        assert f"{usable} samples, {usable} usable ({text_only} text-only), 0 bad" in out


@pytest.mark.slow
def test_killed_then_failed_runs_resume_to_the_same_json(next_source, next_prepared, tmp_path):
    reference, _ = next_prepared
    output = tmp_path / "prepared"
    command = [
        sys.executable,
        "-m",
        "pmod_cli",
        "data",
        "prepare",
        str(next_source),
        "-o",
        str(output),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    # 1. SIGKILL as soon as the first shard is finished
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first_unit = output / ".prepare" / "units" / "00000.json"
    deadline = time.monotonic() + 240
    while not first_unit.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    process.stderr.close()
    assert not (output / "data.json").exists()  # the final JSON appears whole or not at all
    assert not list(output.glob("*.part"))
    after_kill = whole_images(output)
    assert after_kill  # shard 0's images are there, whole

    # 2. a write that fails mid-way (the big image of shard 2 is over the file-size limit)
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    failed = run_prepare(str(next_source), "-o", str(output), preexec_fn=small_files)
    assert failed.returncode == 2
    assert (
        "cannot write image" in one_error_line(failed.stderr)
        and "run the same command again" in failed.stderr
    )
    assert (
        not (output / "data.json").exists()
        and (output / ".prepare" / "units" / "00001.json").exists()
    )
    assert not list((output / ".prepare" / "tmp").iterdir())  # its temporary removed
    # shard 2's small images were written before its big one failed
    after_failure = whole_images(output)
    assert after_kill.items() < after_failure.items()

    # 3. the resumed run finishes with what an uninterrupted run wrote
    resumed = run_prepare(str(next_source), "-o", str(output), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["reused_units"] == 2
    assert (output / "data.json").read_bytes() == (reference / "data.json").read_bytes()
    assert (output / "dropped.jsonl").read_bytes() == (reference / "dropped.jsonl").read_bytes()
    final = whole_images(output)
    assert final.keys() == whole_images(reference).keys()
    # images written before were not written again: neither those of the finished shards nor
    # those of shard 2, which the last run read again
    assert all(final[name] == stamp for name, stamp in after_failure.items())
    assert not (output / ".prepare").exists()


# ---- the 665K-mix JSON ----------------------------------------------------------------------

MIX_SAMPLES = [
    (
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": chat()},
        "kept",
    ),
    (
        {
            "id": 7,
            "image": "gqa/images/2354786.jpg",
            "conversations": chat() + chat("And now?", "Still."),
        },
        "kept",
    ),
    (
        {"id": "sharegpt_1", "model": "", "conversations": chat("Write a poem.", "Roses.")},
        "kept",
    ),  # text-only
    ({"id": "ocr_1", "image": "ocr_vqa/images/1.jpg", "conversations": chat()}, "missing_image"),
    (
        {"id": "bad_jpg", "image": "coco/train2017/not_an_image.jpg", "conversations": chat()},
        "unreadable_image",
    ),
    (
        {"id": "cut_png", "image": "coco/train2017/truncated.png", "conversations": chat()},
        "unreadable_image",
    ),
    (
        {"id": "cut_jpg", "image": "coco/train2017/truncated.jpg", "conversations": chat()},
        "unreadable_image",
    ),
    (
        {
            "id": "roles",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nQ"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A"},
            ],
        },
        "wrong_roles",
    ),
    ({"id": "noreply", "conversations": [{"from": "human", "value": "Anyone?"}]}, "no_reply"),
    (
        {
            "id": "numeric",
            "conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": 2}],
        },
        "non_string_value",
    ),
    (
        {
            "id": "twice",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": chat("<image>\n<image>\nQ"),
        },
        "image_count_mismatch",
    ),
    ({"id": "dict_image", "image": {"path": "x.jpg"}, "conversations": chat()}, "bad_image_field"),
    ({"id": "no_conv", "image": "coco/train2017/000000033471.jpg"}, "malformed"),
]


def expected_mix() -> tuple[list, dict]:
    kept = [sample["id"] for sample, outcome in MIX_SAMPLES if outcome == "kept"]
    return kept, {
        str(sample["id"]): outcome for sample, outcome in MIX_SAMPLES if outcome != "kept"
    }


def write_mix665k(directory: Path) -> Path:
    """llava_v1_5_mix665k.json in LLaVA's playground layout, its images next to it."""
    folder = directory / "playground" / "data"
    for name, content in [
        ("coco/train2017/000000033471.jpg", encoded((200, 10, 10), fmt="JPEG")),
        ("gqa/images/2354786.jpg", encoded((10, 200, 10), fmt="JPEG")),
        (
            "ocr_vqa/images/1.png",
            encoded((10, 10, 200)),
        ),  # the JSON says .jpg: a known 665K pitfall
        ("coco/train2017/not_an_image.jpg", b"<html>404</html>"),
        ("coco/train2017/truncated.png", noise_png(64, seed=3)[:-400]),
        ("coco/train2017/truncated.jpg", noise_jpeg(64, seed=4)[:-300]),
    ]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    path = folder / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps([sample for sample, _ in MIX_SAMPLES]))
    return path


@pytest.mark.slow
def test_mix665k_cleaning_counts_each_reason_and_keeps_samples_as_they_are(tmp_path):
    source = write_mix665k(tmp_path)
    output = tmp_path / "mix_clean"
    result = run_prepare(str(source), "-o", str(output), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    kept, dropped = expected_mix()
    assert report["format"] == "llava-json" and report["total"] == len(MIX_SAMPLES)
    assert report["kept"] == len(kept) and report["text_only"] == 1 and report["images"] == 2
    assert report["dropped"] == {
        "malformed": 1,
        "non_string_value": 1,
        "wrong_roles": 1,
        "no_reply": 1,
        "image_count_mismatch": 1,
        "bad_image_field": 1,
        "missing_image": 1,
        "unreadable_image": 3,
    }
    assert report["image_folder"] == str(source.parent) and not (output / "images").exists()
    listed = [json.loads(line) for line in (output / "dropped.jsonl").read_text().splitlines()]
    assert {sample["id"]: sample["reason"] for sample in listed} == dropped

    # the kept samples unchanged, ids (int or str) and extra fields and all
    cleaned = json.loads((output / "data.json").read_text())
    assert cleaned == [sample for sample, outcome in MIX_SAMPLES if outcome == "kept"]
    scan = scan_records(load_records(output / "data.json"), source.parent, max_bad_fraction=0.0)
    assert len(scan.valid) == len(kept) and not scan.bad


def test_the_report_table_names_every_reason_with_its_count(tmp_path, monkeypatch, capsys):
    source = write_mix665k(tmp_path)
    # wide enough that the table does not fold the temporary path (longer under parallel workers)
    monkeypatch.setenv("COLUMNS", "250")
    code, captured = run_cli(
        monkeypatch, capsys, "data", "prepare", str(source), "-o", str(tmp_path / "out")
    )
    assert code == 0
    table = " ".join(captured.out.split())
    assert "read │ 13" in table and "kept │ 3 │ 1 text-only; image files: 2" in table
    for reason, count in Counter(expected_mix()[1].values()).items():
        assert f"dropped: {reason} │ {count} │" in table
    assert f'data.image_folder = "{source.parent}"' in table


@pytest.mark.slow
def test_the_hub_path_streams_the_same_shards(next_source, next_prepared, tmp_path, monkeypatch):
    """--from-hub reads through datasets' streaming shards; a local directory in the hub layout
    stands in for the hub (the one network call, the revision lookup, is answered here)."""
    reference, report = next_prepared
    monkeypatch.setattr(prepare_sources, "_hub_revision", lambda repo: "0" * 40)
    result = prepare_data(None, tmp_path / "out", from_hub=str(next_source.parent), progress=False)
    assert result.units == len(NEXT_SHARDS) and result.source.startswith("hub:")
    assert result.dropped == report["dropped"] and result.kept == report["kept"]
    assert (tmp_path / "out" / "data.json").read_bytes() == (reference / "data.json").read_bytes()


# ---- the output directory -------------------------------------------------------------------


def test_a_different_output_is_only_replaced_with_overwrite(
    next_source, tmp_path, monkeypatch, capsys
):
    mix = write_mix665k(tmp_path)
    output = tmp_path / "out"
    assert (
        run_cli(monkeypatch, capsys, "data", "prepare", str(next_source), "-o", str(output))[0] == 0
    )
    written = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}

    # the same command again: nothing to do, nothing rewritten
    code, captured = run_cli(
        monkeypatch, capsys, "data", "prepare", str(next_source), "-o", str(output), "--json"
    )
    assert code == 0 and json.loads(captured.out)["already_prepared"]
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == written

    # another source: refused, and what is there is untouched
    code, captured = run_cli(monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(output))
    assert code == 2 and "--overwrite" in one_error_line(captured.err)
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == written

    # with --overwrite: replaced, and the old images it no longer uses are gone
    code, captured = run_cli(
        monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(output), "--overwrite", "--json"
    )
    assert code == 0 and json.loads(captured.out)["format"] == "llava-json"
    assert sorted(path.name for path in output.iterdir()) == [
        "data.json",
        "dropped.jsonl",
        "prepare.json",
    ]

    # an unfinished run of one source is not taken over by another
    (output / ".prepare").mkdir()
    (output / ".prepare" / "state.json").write_text(
        json.dumps({"version": 1, "fingerprint": {"source": "elsewhere"}})
    )
    code, captured = run_cli(monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(output))
    assert code == 2 and "unfinished preparation of elsewhere" in one_error_line(captured.err)

    # a directory that is not ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, captured = run_cli(
        monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(foreign), "--overwrite"
    )
    assert code == 2 and "not empty" in one_error_line(captured.err)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_two_runs_never_write_one_directory(tmp_path, monkeypatch, capsys):
    import fcntl

    mix = write_mix665k(tmp_path)
    output = tmp_path / "out"
    output.mkdir()
    descriptor = os.open(output, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a run in progress holds it
        code, captured = run_cli(
            monkeypatch, capsys, "data", "prepare", str(mix), "-o", str(output)
        )
    finally:
        os.close(descriptor)
    assert code == 2 and "another `pmod data prepare` is writing" in one_error_line(captured.err)
    assert not any(output.iterdir())


@pytest.mark.parametrize(
    ("make_args", "named"),
    [
        (lambda tmp: [str(tmp / "nowhere"), "-o", str(tmp / "o")], "does not exist"),
        (lambda tmp: [str(tmp), "-o", str(tmp / "o")], "holds no .parquet files"),
        (lambda tmp: ["-o", str(tmp / "o")], "either a SOURCE"),
        (lambda tmp: [str(tmp), "--from-hub", "a/b", "-o", str(tmp / "o")], "either a SOURCE"),
        (
            lambda tmp: [str(write_text(tmp / "x.json", "{}")), "-o", str(tmp / "o")],
            "must hold a JSON list",
        ),
        (lambda tmp: [str(write_text(tmp / "x.json", "[{")), "-o", str(tmp / "o")], "cannot parse"),
        (
            lambda tmp: [
                str(write_text(tmp / "x.json", "[]")),
                "--image-folder",
                str(tmp / "nope"),
                "-o",
                str(tmp / "o"),
            ],
            "is not a directory",
        ),
        (
            lambda tmp: [str(write_text(tmp / "x.parquet", "not parquet")), "-o", str(tmp / "o")],
            "cannot read",
        ),
        (
            lambda tmp: [
                str(write_text(tmp / "x.json", "[]")),
                "-o",
                str(write_text(tmp / "file", "")),
            ],
            "cannot create",
        ),
        (
            lambda tmp: [
                str(write_text(tmp / "x.json", "[]")),
                "-o",
                str(tmp / "o"),
                "--workers",
                "0",
            ],
            "--workers",
        ),
    ],
)
def test_bad_input_is_one_error_line(make_args, named, tmp_path, monkeypatch, capsys):
    args = make_args(tmp_path)
    code, captured = run_cli(monkeypatch, capsys, "data", "prepare", *args)
    assert code == 2 and named in one_error_line(captured.err)
    assert not (tmp_path / "o").exists()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_offline_hub_is_one_error_line(tmp_path):
    output = tmp_path / "hub"
    result = run_prepare(
        "--from-hub", "lmms-lab/LLaVA-NeXT-Data", "-o", str(output), env={"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 2 and "HF_HUB_OFFLINE is set" in one_error_line(result.stderr)
    assert not output.exists()
