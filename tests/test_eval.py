"""`pmod eval` and the lmms-eval model ``pmod``, end to end on tiny checkpoints and the offline
tiny task (the held-out split of the synthetic set, built in the pmod cache on first use)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model
from typer.testing import CliRunner

import pmod_cli
from pmod_cli import PMoDConfig, apply_pmod
from pmod_cli.cli import app, main
from pmod_cli.errors import UserError
from pmod_cli.evaluation import run as eval_run
from pmod_cli.evaluation.run import PAPER_GROUP, evaluate_checkpoints, make_task_manager
from pmod_cli.evaluation.tasks import TASKS_DIR
from pmod_cli.model.cache import kv_cache_bytes
from pmod_cli.model.schedules import kept_count
from pmod_cli.runtime import resolve_device

PAPER_TASKS = [
    "ok_vqa", "scienceqa_img", "mme", "seedbench", "pope", "realworldqa", "gqa", "ai2d",
    "textvqa_val", "chartqa", "docvqa_val", "infovqa_val", "mmbench_en_dev", "mmmu_val",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense_model, processor = tiny_model(layout="llava", layers=4)
    dense = save_checkpoint(dense_model, processor, root / "dense")
    apply_pmod(dense_model, PMoDConfig(beta=0.5))  # 4 layers: ratios 1, 0.75, 0.25, 0.15
    randomize_routers(dense_model)
    pmod = save_checkpoint(dense_model, processor, root / "pmod")
    next_model, next_processor = tiny_model(layout="next", layers=4)
    apply_pmod(next_model, PMoDConfig(beta=0.5))
    randomize_routers(next_model)
    pmod_next = save_checkpoint(next_model, next_processor, root / "pmod_next")
    return {"dense": dense, "pmod": pmod, "pmod_next": pmod_next, "root": root}


def expected_kv_bytes(measurement: dict, ratios: list[float], entry_bytes: int) -> int:
    """What a sample should hold after prefill: T + floor(V * R_l) entries in layer l."""
    vision, text = measurement["vision_tokens"], measurement["text_tokens"]
    return sum((text + kept_count(vision, ratio)) * entry_bytes for ratio in ratios)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.slow
def test_pmod_eval_reports_accuracy_and_measured_efficiency(checkpoints, tmp_path, umask_022):
    output = tmp_path / "reports" / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(checkpoints["pmod"]),
            str(checkpoints["dense"]),
            "--tasks",
            "pmod_tiny_vqa,pmod_tiny_vqa_mc",
            "--limit",
            "4",
            "--batch-size",
            "2",
            "--output",
            str(output),
            "--device",
            "cpu",
        ],  # fmt: skip
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    for row in (
        "pmod_tiny_vqa (exact_match)", "pmod_tiny_vqa_mc (acc)", "TFLOPs (paper count)",
        "KV cache per sample", "prefill latency", "end-to-end latency", "peak RSS growth (CPU)",
    ):  # fmt: skip
        assert row in result.output
    assert list(output.parent.iterdir()) == [output]  # written through a temporary file, renamed

    # an ordinary file, as the umask says (not mkstemp's 0600)
    assert stat.S_IMODE(output.stat().st_mode) == 0o644
    report = json.loads(output.read_text())
    assert report["schema_version"] == eval_run.EVAL_SCHEMA_VERSION
    assert report["versions"] == {
        "pmod": pmod_cli.__version__,
        **{name: metadata.version(name) for name in ("torch", "transformers", "lmms_eval")},
    }
    made = datetime.strptime(report["created_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - made).total_seconds()) < 3600
    pmod, dense = report["checkpoints"]
    assert [pmod["label"], dense["label"]] == ["pmod", "dense"]
    assert pmod["retention_ratios"] == pytest.approx([1.0, 0.75, 0.25, 0.15])
    assert dense["retention_ratios"] == [1.0] * 4
    for checkpoint in (pmod, dense):
        assert set(checkpoint["scores"]) == {"pmod_tiny_vqa", "pmod_tiny_vqa_mc"}
        assert all(0.0 <= score["value"] <= 1.0 for score in checkpoint["scores"].values())
        assert len(checkpoint["answers"]["pmod_tiny_vqa"]) == 4
        generated = [m for m in checkpoint["measurements"] if m["request"] == "generate_until"]
        scored = [m for m in checkpoint["measurements"] if m["request"] == "loglikelihood"]
        assert len(generated) == 4 and len(scored) >= 4 * 2  # every choice of 4 questions
        assert all(m["batch_size"] == 2 and m["vision_tokens"] == 16 for m in generated)
        # the system prompt stands before the image; the question after it
        assert all(0 < m["prefix_text_tokens"] < m["text_tokens"] for m in generated)
        assert all(0 < m["prefill_s"] <= m["end_to_end_s"] for m in checkpoint["measurements"])

    # the dense model holds exactly its dense twin's cache; p-MoD holds T + floor(V R_l) per layer,
    # also at batch 2 with left padding
    assert dense["efficiency"]["kv_cache_vs_dense"] == 1.0
    assert dense["efficiency"]["tflops_vs_dense"] == 1.0
    entry_bytes = 2 * 2 * 16 * 4  # K and V, 2 kv heads of 16 dims, fp32
    for measurement in pmod["measurements"]:
        assert measurement["kv_cache_bytes"] == expected_kv_bytes(
            measurement, pmod["retention_ratios"], entry_bytes
        )
        assert measurement["dense_kv_cache_bytes"] == expected_kv_bytes(
            measurement, [1.0] * 4, entry_bytes
        )
    assert pmod["efficiency"]["kv_cache_vs_dense"] < 1.0
    assert pmod["efficiency"]["tflops_vs_dense"] < 1.0
    # same shape, same prompts: the same dense reference
    assert pmod["efficiency"]["dense_tflops"] == dense["efficiency"]["dense_tflops"]


@pytest.mark.slow
def test_json_on_stdout_names_the_command_and_the_dtype(checkpoints, monkeypatch, capsys):
    args = [str(checkpoints["pmod"]), "--tasks", "pmod_tiny_vqa", "--limit", "2", "--device", "cpu"]
    args += ["--dtype", "float32", "--json"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/pmod", "eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    report = json.loads(out)  # exactly one JSON object, no table
    assert report["command"] == "pmod eval " + " ".join(args)
    assert report["dtype"] == "fp32" and report["device"] == "cpu"
    (result,) = report["checkpoints"]
    assert len(result["answers"]["pmod_tiny_vqa"]) == 2


@pytest.mark.slow
def test_batched_generation_answers_like_batch_one(checkpoints):
    # LLaVA-NeXT: held-out images of several aspect ratios give different numbers of vision
    # tokens per sample, so a batch is really padded
    runs = {
        batch: evaluate_checkpoints(
            [checkpoints["pmod_next"]], ["pmod_tiny_vqa"], limit=6, batch_size=batch, device="cpu"
        ).checkpoints[0]
        for batch in (1, 4)
    }
    single, batched = runs[1], runs[4]
    vision_counts = {m.vision_tokens for m in single.measurements}
    assert len(vision_counts) > 1
    answers = {row["doc_id"]: row["answer"] for row in single.answers["pmod_tiny_vqa"]}
    assert answers == {row["doc_id"]: row["answer"] for row in batched.answers["pmod_tiny_vqa"]}
    assert any(answer for answer in answers.values())
    # each sample holds the same cache whatever it was batched with (padding not counted)
    by_doc = {m.doc_id: m.kv_cache_bytes for m in single.measurements}
    assert by_doc == {m.doc_id: m.kv_cache_bytes for m in batched.measurements}
    assert {m.batch_size for m in batched.measurements} == {4, 2}


def test_loglikelihood_is_the_continuation_loss(checkpoints):
    from lmms_eval.api.instance import Instance

    from pmod_cli.evaluation.lmms_model import PMoDLmms
    from pmod_cli.evaluation.measure import PrefillProbe

    lm = PMoDLmms(pretrained=str(checkpoints["pmod"]), device="cpu")
    image = random_image(56, 56, seed=3)
    lm.task_dict = {"shapes": {"test": [{"image": image}]}}
    args = ("What colour is the square?", " red", lambda doc: [doc["image"]], 0, "shapes", "test")
    (result,) = lm.loglikelihood(
        [
            Instance(
                "loglikelihood", args, idx=0, metadata={"task": "shapes", "doc_id": 0, "repeats": 1}
            )
        ]
    )
    nll, greedy = result.text  # lmms-eval reads the pair from GenerationResult.text

    # reference: HF's own loss over the continuation tokens, on the same prompt
    prompt = lm.processor(text=[lm.build_prompt(args[0], 1)], images=[image], return_tensors="pt")
    continuation = lm.tokenizer(" red", add_special_tokens=False, return_tensors="pt").input_ids
    input_ids = torch.cat([prompt["input_ids"], continuation], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100
    with torch.no_grad():
        loss = lm.model(
            input_ids=input_ids, pixel_values=prompt["pixel_values"], labels=labels
        ).loss
    assert nll == pytest.approx(loss.item() * continuation.shape[1], rel=1e-4)
    assert isinstance(greedy, bool)

    # the probe's per-sample bytes are the cache's own bytes at batch 1
    probe = PrefillProbe(lm.model, torch.device("cpu"))
    probe.start(torch.ones_like(prompt["input_ids"]))
    with torch.no_grad():
        cache = lm.model(**prompt, use_cache=True).past_key_values
    probe.stop()
    assert probe.kv_bytes == [kv_cache_bytes(cache)]
    assert probe.dense_kv_bytes[0] > probe.kv_bytes[0]


@pytest.mark.slow
def test_lmms_eval_command_line_runs_the_pmod_model(checkpoints, tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "pmod",
        "--model_args", f"pretrained={checkpoints['pmod']},device=cpu",
        "--tasks", "pmod_tiny_vqa", "--include_path", str(TASKS_DIR),
        "--limit", "3", "--batch_size", "2", "--output_path", str(tmp_path / "lmms"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Error during evaluation" not in completed.stdout + completed.stderr
    (results_file,) = (tmp_path / "lmms").rglob("*results.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["pmod_tiny_vqa"]
    assert results["config"]["model"] == "pmod"
    # the model's measurements reach lmms-eval's own summary
    assert results["throughput"]["avg_prefill_latency_s"] > 0
    assert 0 < results["throughput"]["avg_kv_cache_vs_dense"] < 1


@pytest.mark.slow
def test_paper_benchmarks_resolve_and_the_group_names_all_14(monkeypatch):
    manager = make_task_manager([PAPER_GROUP])
    missing = [task for task in PAPER_TASKS if task not in manager.all_tasks]
    assert missing == []
    assert PAPER_GROUP in manager.all_groups
    group = yaml.safe_load((TASKS_DIR / "pmod_paper14" / "pmod_paper14.yaml").read_text())
    assert group["task"] == PAPER_TASKS

    # mmbench_en_dev's GPT judge needs a key: said up front, also when asked through the group
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    (warning,) = eval_run.judge_warnings([PAPER_GROUP], manager)
    assert "mmbench_en_dev" in warning and "OPENAI_API_KEY" in warning and "\n" not in warning
    assert eval_run.judge_warnings(["mme", "pmod_tiny_vqa"], manager) == []
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert eval_run.judge_warnings(["mmbench_en_dev"], manager) == []


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["pmod", "eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{root}/missing", "--tasks", "pmod_tiny_vqa"], "checkpoint directory not found"),
        (
            ["{pmod}", "--tasks", "pmod_tiny_vqa", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--limit", "0"], "--limit must be at least 1"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--device", "tpu"], "--device must be cpu or cuda"),
        (["{pmod}", "--tasks", "pmod_tiny_vqa", "--count", "most"], "unknown FLOPs count 'most'"),
        (
            ["{pmod}", "--tasks", "pmod_tiny_vqa", "--include-path", "{root}/none"],
            "is not a directory",
        ),
        (["{pmod}", "--tasks", "pmod_tiny_vqa,mmee"], "unknown task 'mmee'; did you mean mme"),
        (
            ["{pmod}", "--tasks", "pmod_tiny_vqa", "--device", "cuda:x"],
            "--device must be cpu or cuda",
        ),
        (
            ["{pmod}", "--tasks", "pmod_tiny_vqa", "--output", "{root}"],
            "is a directory; give a file name",
        ),
        (
            ["{pmod}", "--tasks", "pmod_tiny_vqa", "--output", "{pmod}/config.json/eval.json"],
            "config.json is a file, not a directory",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(checkpoints, monkeypatch, capsys, arguments, message):
    arguments = [a.format(root=checkpoints["root"], pmod=checkpoints["pmod"]) for a in arguments]
    code, stderr = run_main(monkeypatch, capsys, *arguments)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="would download MME")
def test_a_benchmark_without_its_data_is_a_user_error(checkpoints, monkeypatch, capsys):
    code, stderr = run_main(
        monkeypatch, capsys, str(checkpoints["pmod"]), "--tasks", "mme", "--limit", "1"
    )
    assert code == 2
    # the model loads first (its progress bar), then one line, no traceback
    assert stderr.splitlines()[-1].startswith("error: cannot fetch the data of mme")
    assert "Traceback" not in stderr and stderr.count("error:") == 1


def test_output_is_checked_before_anything_is_evaluated(checkpoints, monkeypatch, capsys, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("evaluated before --output was checked")

    monkeypatch.setattr(eval_run, "evaluate_checkpoints", never)
    access = os.access
    # a folder this process may not write in (chmod would not stop root)
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == tmp_path else access(path, mode)
    )
    target = tmp_path / "new" / "eval.json"
    code, stderr = run_main(
        monkeypatch,
        capsys,
        str(checkpoints["pmod"]),
        "--tasks",
        "pmod_tiny_vqa",
        "--output",
        str(target),
    )
    assert code == 2 and stderr.startswith("error: ") and f"cannot write in {tmp_path}" in stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_failed_report_write_is_a_user_error_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the report to"):
        eval_run.write_json_atomically({"a": 1}, tmp_path / "file" / "eval.json")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="cannot write the report to"):
        eval_run.write_json_atomically({"a": 1}, tmp_path / "taken")  # os.replace onto a directory
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_cuda_index_is_checked_against_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(UserError, match="torch sees 1 CUDA GPU here"):
        resolve_device("cuda:1")


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: __import__("huggingface_hub").errors.LocalTokenNotFoundError(
            "Token is required (`token=True`)"
        ),
        lambda: __import__("httpx").ConnectError("[Errno -3] Temporary failure in name resolution"),
        lambda: __import__("httpx").ConnectTimeout("timed out"),
        lambda: __import__("datasets").exceptions.DatasetNotFoundError("lmms-lab/MME"),
        lambda: TimeoutError("read timed out"),
    ],
)
def test_network_and_login_errors_are_found_behind_wrappers(make_error):
    error = make_error()
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("RetryError[<Future state=finished raised>]") from inner
    except RuntimeError as outer:
        assert eval_run._offline_cause(outer) is error
    assert eval_run._offline_cause(ValueError("a bug")) is None


@pytest.mark.slow
def test_missing_hub_login_ends_in_one_error_line_after_the_judge_warning(
    checkpoints, monkeypatch, capsys
):
    from huggingface_hub.errors import LocalTokenNotFoundError

    def simple_evaluate(**kwargs):
        try:
            raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
        except LocalTokenNotFoundError as inner:
            raise RuntimeError("RetryError") from inner

    monkeypatch.setattr("lmms_eval.evaluator.simple_evaluate", simple_evaluate)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    code, stderr = run_main(
        monkeypatch,
        capsys,
        str(checkpoints["pmod"]),
        "--tasks",
        "mmbench_en_dev",
        "--device",
        "cpu",
    )
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith(("warning:", "error:"))]
    assert (
        lines[0].startswith("warning: mmbench_en_dev's gpt_eval_score")
        and "OPENAI_API_KEY" in lines[0]
    )
    assert lines[-1].startswith(
        "error: cannot fetch the data of mmbench_en_dev: LocalTokenNotFoundError"
    )
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_task_files_go_beside_the_report_not_into_the_current_directory(
    checkpoints, monkeypatch, tmp_path
):
    # a task whose aggregation writes a submission file, as ok_vqa / textvqa_val / mmbench do
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "submitting.py").write_text(
        "import json\n"
        "from lmms_eval.tasks._task_utils.file_utils import generate_submission_file\n"
        "def process_results(doc, results):\n"
        "    return {'exact_match': 0.0, 'submission': {'id': doc['id'], 'answer': results[0]}}\n"
        "def write_submission(results, args):\n"
        "    with open(generate_submission_file('tiny_submission.json', args), 'w') as stream:\n"
        "        json.dump(results, stream)\n"
        "    return len(results)\n"
    )
    (tasks / "pmod_tiny_vqa_submitting.yaml").write_text(
        f"task: pmod_tiny_vqa_submitting\n"
        f"include: {TASKS_DIR / 'pmod_tiny_vqa' / 'pmod_tiny_vqa.yaml'}\n"
        "process_results: !function submitting.process_results\n"
        "metric_list:\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: submission\n    aggregation: !function submitting.write_submission\n    higher_is_better: true\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    output = tmp_path / "reports" / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(checkpoints["pmod"]),
            "--tasks",
            "pmod_tiny_vqa_submitting",
            "--include-path",
            str(tasks),
            "--limit",
            "2",
            "--output",
            str(output),
            "--device",
            "cpu",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert list(work.iterdir()) == []
    submitted = json.loads(
        (
            tmp_path
            / "reports"
            / "eval_lmms_eval"
            / "pmod"
            / "submissions"
            / "tiny_submission.json"
        ).read_text()
    )
    assert len(submitted) == 2
    assert (
        json.loads(output.read_text())["checkpoints"][0]["scores"]["pmod_tiny_vqa_submitting"][
            "value"
        ]
        == 0.0
    )


def test_beam_search_is_measured_per_sample(checkpoints):
    from lmms_eval.api.instance import Instance

    from pmod_cli.evaluation.lmms_model import PMoDLmms

    lm = PMoDLmms(pretrained=str(checkpoints["pmod"]), device="cpu", batch_size=2)
    lm.task_dict = {
        "shapes": {"test": [{"image": random_image(56, 56, seed=seed)} for seed in range(2)]}
    }
    held = {}
    for beams in (1, 3):
        lm.measurements = []
        settings = {"max_new_tokens": 3, "num_beams": beams, "until": ["\n"]}
        requests = [
            Instance(
                "generate_until",
                (question, dict(settings), lambda doc: [doc["image"]], doc_id, "shapes", "test"),
                idx=0,
                metadata={"task": "shapes", "doc_id": doc_id, "repeats": 1},
            )
            for doc_id, question in enumerate(
                ["What colour is the square?", "How many circles are there?"]
            )
        ]
        answers = lm.generate_until(requests)
        assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
        held[beams] = {
            m.doc_id: (m.kv_cache_bytes, m.dense_kv_cache_bytes) for m in lm.measurements
        }
    # each of a sample's beams holds what the sample alone holds
    assert held[3] == {doc: (3 * kv, 3 * dense) for doc, (kv, dense) in held[1].items()}


def test_model_args_batch_size_wins_over_lmms_eval_s_own(checkpoints):
    from pmod_cli.evaluation.lmms_model import PMoDLmms

    # lmms-eval's command line always passes its --batch_size (default 1) and --device
    lm = PMoDLmms.create_from_arg_string(
        f"pretrained={checkpoints['pmod']},batch_size=3,device=cpu",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda"},
    )
    assert lm.batch_size == 3 and lm.device.type == "cpu"


def sentencepiece_like_tokenizer():
    """A tokenizer that splits like Llama's SentencePiece: " A" alone is ["▁", "▁A"], after
    "Answer:" it is ["▁A"]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(
        ["Answer: A", "Answer: B", "Question: which one? Answer: A"], trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_continuation_tokens_are_those_it_has_after_the_context():
    from pmod_cli.evaluation.lmms_model import PMoDLmms

    lm = PMoDLmms.__new__(PMoDLmms)  # only the tokenizer is needed
    lm.tokenizer, lm._device = sentencepiece_like_tokenizer(), torch.device("cpu")
    alone = lm.tokenizer.tokenize(" A")
    assert alone == ["▁", "▁A"]  # what tokenizing the continuation apart would score
    for context, continuation in (
        ("Answer:", " A"),
        ("Answer: ", "A"),
    ):  # a trailing space moves over
        inputs, context_length = lm._encode_continuation(context, continuation, None)
        tokens = lm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        assert tokens[:context_length] == ["▁Answer:"] and tokens[context_length:] == ["▁A"]
        assert inputs["attention_mask"].shape == inputs["input_ids"].shape


def test_image_tokens_placed_by_the_task_become_image_items():
    from pmod_cli.data.prompts import build_prompt

    _, processor = tiny_model(layout="llava", layers=1)
    # like llava-hf's templates: renders content items, so a plain-string content vanishes
    processor.chat_template = (
        "{% for message in messages %}{{ message['role'].upper() }}: "
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    assert (
        build_prompt(processor, "<image>\nWhat colour is the square?", 1)
        == "USER: <image>\nWhat colour is the square? ASSISTANT:"
    )
    assert (
        build_prompt(processor, "Left: <image> right: <image>", 2)
        == "USER: Left:<image>\nright:<image>\n ASSISTANT:"
    )
    assert (
        build_prompt(processor, "What colour is the square?", 1)
        == "USER: <image>\nWhat colour is the square? ASSISTANT:"
    )


@pytest.mark.slow
def test_two_processes_give_the_scores_of_one(checkpoints, tmp_path, free_port):
    """``torchrun --nproc_per_node 2`` on the CPU (gloo): each process takes its share of the
    requests, process 0 reports once, with the scores, answers and measured requests of one
    process; lmms-eval's padding of the uneven shares (5 questions) is neither scored nor measured."""
    tasks = ["pmod_tiny_vqa", "pmod_tiny_vqa_mc"]
    one = eval_run.report_to_json(
        evaluate_checkpoints([checkpoints["pmod"]], tasks, limit=5, device="cpu")
    )
    output = tmp_path / "two.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
        "-m", "pmod_cli", "eval", str(checkpoints["pmod"]), "--tasks", ",".join(tasks), "--limit", "5",
        "--device", "cpu", "--output", str(output),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pmod eval: pmod_tiny_vqa") == 1  # one report, from process 0
    single, double = one["checkpoints"][0], json.loads(output.read_text())["checkpoints"][0]
    assert double["scores"] == single["scores"]
    for task in tasks:
        assert sorted(map(json.dumps, double["answers"][task])) == sorted(
            map(json.dumps, single["answers"][task])
        )

    def requests(result):
        return sorted((m["task"], m["doc_id"], m["request"]) for m in result["measurements"])

    assert requests(double) == requests(single) and len(requests(single)) > 5
    assert double["efficiency"]["processes"] == 2 and single["efficiency"]["processes"] == 1
    assert double["efficiency"]["samples"] == single["efficiency"]["samples"]
    assert double["efficiency"]["tflops"] == single["efficiency"]["tflops"]
