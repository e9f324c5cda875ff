"""`pmod eval`: lmms-eval's ``simple_evaluate`` on each checkpoint, accuracy and measured efficiency.

    report = evaluate_checkpoints(["runs/tiny/sft", "runs/tiny/sft_dense"], ["pmod_tiny_vqa"], limit=50)
    report.checkpoints[0].scores["pmod_tiny_vqa"].value, report.checkpoints[0].efficiency.tflops

Each checkpoint runs in the ``pmod`` lmms-eval model (``lmms_model.PMoDLmms``), which measures
every request; the efficiency summary turns the measurements into the report's rows:

- TFLOPs: ``count_flops_for_model`` (the formula of ``pmod flops``) for the checkpoint's own
  config and retention ratios, at the mean measured V and T of the evaluated prompts;
- KV cache: mean bytes a sample held after prefill, and its share of what the dense twin holds
  for the same prompts, (T + V) entries in every layer (computed from the measured token counts);
- latencies and peak memory as ``measure.py`` defines them.

``methods`` evaluates each checkpoint once per token-reduction method (``model/methods/``: its
own routing, dense, FastV, random, pool), each a column of the same table:

    evaluate_checkpoints(["runs/grid/pmod"], ["pmod_grid_vqa"], methods=["pmod", "fastv"], match_tflops=True)

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) each process evaluates its share
of the requests (``lmms_model``); lmms-eval gathers the scores on process 0, and so does pmod the
measurements, so the efficiency rows cover every request. Only process 0 gets a report
(``evaluate_checkpoints`` returns None on the others).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..efficiency.flops import COUNT_MODES, count_flops_for_model
from ..errors import UserError
from ..model.families import get_family, known_model_types
from ..model.loading import read_model_type
from ..model.methods import TokenMethod, parse_method
from ..model.presets import read_hf_config, shape_from_hf_config
from ..provenance import report_header
from ..runtime import parse_dtype, resolve_device
from .measure import MEMORY_KINDS, SampleMeasurement
from .tasks import TASKS_DIR

# imported where used: lmms_eval (the eval extra, slow to import; also through .lmms_model),
# torch.distributed, and the optional packages whose network errors _network_errors knows

# the metric each report row shows; other tasks show their first metric
MAIN_METRICS = {
    "pmod_tiny_vqa": "exact_match",
    "pmod_tiny_vqa_mc": "acc",
    "pmod_tiny_video": "exact_match",
    "pmod_tiny_multi_image": "exact_match",
    "ok_vqa_val2014": "exact_match",
    "scienceqa_img": "exact_match",
    "mme": "mme_perception_score",  # the paper reports MME perception
    "seedbench": "seed_image",  # SEED-Bench (image)
    "pope": "pope_f1_score",
    "pope_adv": "pope_f1_score",
    "pope_pop": "pope_f1_score",
    "pope_random": "pope_f1_score",
    "realworldqa": "exact_match",
    "gqa": "exact_match",
    "ai2d": "exact_match",
    "textvqa_val": "exact_match",
    "chartqa": "relaxed_overall",
    "docvqa_val": "anls",
    "infovqa_val": "anls",
    "mmbench_en_dev": "gpt_eval_score",
    "mmmu_val": "mmmu_acc",
}
# eval.json's layout; raised when a field changes meaning or goes away (docs/eval.md)
EVAL_SCHEMA_VERSION = 1
PAPER_GROUP = "pmod_paper14"  # tasks/pmod_paper14: the paper's 14 benchmarks
# tasks whose main metric asks a GPT model to match the answers its own matching misses
# (lmms-eval's mmbench: API_TYPE openai reads OPENAI_API_KEY, azure AZURE_API_KEY), and the
# task that matches without one
JUDGED_TASKS = {"mmbench_en_dev": ("gpt_eval_score", "mmbench_en_dev_static")}

logger = logging.getLogger(__name__)


@dataclass
class TaskScore:
    metric: str
    value: float
    stderr: float | None


@dataclass
class Efficiency:
    """Means over every measured request of one checkpoint."""

    samples: int
    batch_size: int
    device: str
    mean_vision_tokens: float
    mean_text_tokens: float
    flops_count: str  # "paper" | "full" (see pmod_cli.efficiency.flops.COUNT_MODES)
    tflops: float  # at round(mean V), round(mean T)
    dense_tflops: float
    kv_cache_bytes: float  # mean per sample, after prefill
    dense_kv_cache_bytes: float
    prefill_latency_s: float
    end_to_end_latency_s: float
    peak_memory_bytes: int  # the largest of any batch
    memory_kind: str  # see measure.MEMORY_KINDS
    processes: int = 1  # the processes that shared the requests (torchrun / accelerate launch)

    @property
    def tflops_ratio(self) -> float:
        return self.tflops / self.dense_tflops

    @property
    def kv_cache_ratio(self) -> float:
        return self.kv_cache_bytes / self.dense_kv_cache_bytes

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tflops_vs_dense": self.tflops_ratio,
            "kv_cache_vs_dense": self.kv_cache_ratio,
            "memory_description": MEMORY_KINDS[self.memory_kind],
        }


@dataclass
class CheckpointResult:
    checkpoint: str
    label: str
    model_type: str
    retention_ratios: list[float]
    scores: dict[str, TaskScore]
    efficiency: Efficiency | None
    measurements: list[SampleMeasurement] = field(default_factory=list)
    answers: dict[str, list[dict]] = field(
        default_factory=dict
    )  # task -> [{doc_id, target, answer}]
    lmms_eval_results: dict = field(default_factory=dict)  # lmms-eval's own "results" section
    method: TokenMethod | None = None  # the method it ran (None: the checkpoint as saved)
    matched_at: dict | None = None  # --match-tflops: the V, T, crops and TFLOPs it matched at


@dataclass
class EvalReport:
    tasks: list[str]
    limit: int | None
    batch_size: int
    device: str
    checkpoints: list[CheckpointResult]
    dtype: str = "auto"  # as --dtype gives it: bf16, fp16, fp32 or auto (the checkpoint's own)

    @property
    def task_rows(self) -> list[str]:
        """Every task that has a score in some checkpoint, in lmms-eval's order."""
        rows: list[str] = []
        for result in self.checkpoints:
            rows.extend(task for task in result.scores if task not in rows)
        return rows


def evaluate_checkpoints(
    checkpoints: list[str | Path],
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    include_path: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    count: str = "paper",
    lmms_eval_dir: str | Path | None = None,
    methods: list[TokenMethod | str | None] | None = None,
    match_tflops: bool = False,
) -> EvalReport | None:
    """Run lmms-eval on each checkpoint (once per method of ``methods``, None: as saved); user
    errors (paths, task names, flags) raise UserError. None on every process but the first of a
    multi-process run.

    lmms-eval's own files (the submission files of ok_vqa, textvqa_val, mmbench_en_dev, ...) go
    to ``lmms_eval_dir/<label>/submissions``; without it to a temporary directory, deleted after
    each checkpoint.
    """
    methods = _checked_methods(checkpoints, methods, match_tflops, batch_size, limit)
    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    if count not in COUNT_MODES:
        raise UserError(f"unknown FLOPs count {count!r}; choose one of {', '.join(COUNT_MODES)}")
    task_manager = make_task_manager(tasks, include_path)
    for warning in judge_warnings(tasks, task_manager):
        logger.warning(warning)

    results = []
    for run in _runs(checkpoints, methods, match_tflops):
        with _submission_files(lmms_eval_dir, run.name) as files:
            cli_args = lmms_eval_cli_args(tasks, limit, batch_size, device, files)
            result = _evaluate_one(
                run, tasks, task_manager, limit, batch_size, device, count, cli_args, dtype=dtype
            )
        results.append(result)
    if not is_main_process():
        return None
    return EvalReport(
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
        checkpoints=results,
        dtype=dtype,
    )


def _checked_methods(
    checkpoints: list[str | Path],
    methods: list[TokenMethod | str | None] | None,
    match_tflops: bool,
    batch_size: int,
    limit: int | None,
) -> list[TokenMethod | None]:
    """The methods parsed, once every checkpoint is readable and runs them and the numbers are
    in range: a clear error before anything loads."""
    if not checkpoints:
        raise UserError("give at least one checkpoint directory")
    methods = [parse_method(m) if isinstance(m, str) else m for m in (methods or [None])]
    for checkpoint in checkpoints:
        read_model_type(checkpoint)
        for method in methods:
            check_method_fits(checkpoint, method, match_tflops)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return methods


@contextlib.contextmanager
def _submission_files(lmms_eval_dir: str | Path | None, name: str):
    """Where lmms-eval's own files of one run go: ``lmms_eval_dir/<name>``, or a temporary
    directory deleted after the run."""
    with tempfile.TemporaryDirectory(prefix="pmod-eval-") as temporary:
        yield (
            Path(lmms_eval_dir) / _file_name(name) if lmms_eval_dir is not None else Path(temporary)
        )


@dataclass(frozen=True)
class _Run:
    checkpoint: Path
    checkpoint_label: str
    method: TokenMethod | None
    match_tflops: bool

    @property
    def name(self) -> str:
        """Its lmms-eval files' folder: the checkpoint's label, then the method's name."""
        if self.method is None:
            return self.checkpoint_label
        return f"{self.checkpoint_label}_{self.method.name}"


def _runs(checkpoints: list[str | Path], methods: list[TokenMethod | None], match_tflops: bool):
    """One run per checkpoint and method, in that order."""
    for checkpoint, checkpoint_label in zip(
        checkpoints, checkpoint_labels(checkpoints), strict=True
    ):
        for method in methods:
            matched = match_tflops and method is not None
            yield _Run(Path(checkpoint), checkpoint_label, method, matched)


def check_method_fits(
    checkpoint: str | Path, method: TokenMethod | None, match_tflops: bool = False
) -> None:
    """Refuse, before anything is evaluated, a method the checkpoint cannot run (a knob that
    ``match_tflops`` solves later is checked at one of its settings)."""
    if method is None:
        return
    if method.needs_router and read_model_type(checkpoint) not in known_model_types(pmod=True):
        raise UserError(
            f"{checkpoint} is a dense checkpoint: it has no trained routers for --method {method.name} "
            "(evaluate it without --method, or with --method dense)"
        )
    config = read_hf_config(checkpoint)  # read once: the shape and the method's own checks
    shape = shape_from_hf_config(config, name=str(checkpoint), directory=Path(checkpoint))
    method.check_family(get_family(shape.layout))
    method = method.for_family(shape.layout)
    method.check_config(config)
    if match_tflops and method.knob is not None:
        method = method.settings(max(shape.vision_tokens, 1))[-1]
    method.check(shape.text.num_layers, shape.vision_tokens if method.needs_vision_tokens else None)


def is_main_process() -> bool:
    """Process 0 of a torchrun / accelerate launch (or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gather_measurements(measurements: list[SampleMeasurement]) -> list[SampleMeasurement]:
    """Every process's measurements on process 0 (a collective; the others get [])."""
    import torch.distributed as dist

    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return list(measurements)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(list(measurements), gathered, dst=0)
    return [m for share in gathered for m in share] if gathered is not None else []


def make_task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lmms-eval's TaskManager over pmod's tasks (+ ``include_path``), with lmms-eval's own tasks
    indexed only when a requested name needs them (indexing them all takes seconds)."""
    import lmms_eval.models  # noqa: F401  (sets lmms-eval's log level to WARNING before indexing)
    from lmms_eval.tasks import TaskManager

    if not tasks:
        raise UserError("--tasks is empty; name lmms-eval tasks, e.g. --tasks pmod_tiny_vqa")
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"--include-path {include_path} is not a directory")
        paths.append(str(include_path))
    manager = TaskManager("WARNING", include_path=paths, include_defaults=False)
    if all(task in manager.all_subtasks for task in tasks):  # groups may name lmms-eval's tasks
        return manager
    manager = TaskManager("WARNING", include_path=paths)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(
                f"unknown task {task!r}{hint} (list them with: python -m lmms_eval --tasks list)"
            )
    return manager


def _leaf_tasks(manager, names: list[str], seen: frozenset = frozenset()) -> list[str]:
    """The tasks that ``names`` (tasks, groups, tags) run, groups and tags expanded."""
    from lmms_eval.utils import load_yaml_config

    leaves: list[str] = []
    for name in names:
        entry = manager.task_index.get(name) if isinstance(name, str) else None
        if entry is None or name in seen:
            if isinstance(name, dict) and isinstance(
                name.get("task"), str
            ):  # an inline task config
                leaves.append(name["task"])
            elif isinstance(name, str):
                leaves.append(name)
            continue
        members = entry.get("task")
        if entry["type"] == "group" and members == -1 and entry.get("yaml_path", -1) != -1:
            members = load_yaml_config(entry["yaml_path"], mode="simple").get("task", [])
        if entry["type"] in ("group", "tag") and isinstance(members, list):
            leaves.extend(_leaf_tasks(manager, members, seen | {name}))
        else:
            leaves.append(name)
    return leaves


def judge_warnings(tasks: list[str], task_manager) -> list[str]:
    """One line per requested task (directly or through a group) whose main metric needs an
    API key for its GPT judge that the environment lacks."""
    api_type = os.environ.get("API_TYPE", "openai")
    key = "AZURE_API_KEY" if api_type == "azure" else "OPENAI_API_KEY"
    warnings = []
    for task in dict.fromkeys(_leaf_tasks(task_manager, list(tasks))):
        if task in JUDGED_TASKS and not os.environ.get(key):
            metric, static = JUDGED_TASKS[task]
            warnings.append(
                f"{task}'s {metric} asks a GPT model to match the answers lmms-eval's own matching misses, "
                f"but {key} is not set: those get a random option after ~45 s of retries each "
                f"(set {key}, or run {static} instead)"
            )
    return warnings


def lmms_eval_cli_args(
    tasks: list[str], limit: int | None, batch_size: int, device: str, output_path: str | Path
) -> argparse.Namespace:
    """What lmms-eval's command line would hand its evaluator and tasks (``task.args``): the
    tasks' own files (``generate_submission_file``) go under ``output_path``, not ./submissions."""
    return argparse.Namespace(
        model="pmod",
        tasks=",".join(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
        output_path=str(output_path),
        log_samples=True,
        log_samples_suffix="model_outputs",
        process_with_media=True,  # process_results sees whole docs, as without cli_args
        reasoning_tags=None,  # only the tasks' own (the command line's default strips <think>)
        agentic_trace_mode="basic",
    )


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "checkpoint"


def checkpoint_labels(checkpoints: list[str | Path]) -> list[str]:
    """Column names: directory names, or the paths as given where names repeat."""
    names = [Path(checkpoint).name or str(checkpoint) for checkpoint in checkpoints]
    if len(set(names)) == len(names):
        return names
    return [str(checkpoint) for checkpoint in checkpoints]


def _evaluate_one(
    run: _Run, tasks, task_manager, limit, batch_size, device, count, cli_args, *, dtype
) -> CheckpointResult:
    from .lmms_model import PMoDLmms  # imports lmms-eval (the eval extra), as the run does

    checkpoint = run.checkpoint
    model = PMoDLmms(
        pretrained=str(checkpoint),
        device=device,
        batch_size=batch_size,
        method=run.method,
        match_tflops=run.match_tflops,
        dtype=dtype,
    )
    network = model.model  # lmms-eval's evaluator drops model.model when requests are done
    raw = _simple_evaluate(
        model,
        tasks,
        task_manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        cli_args=cli_args,
    )
    measurements = gather_measurements(model.measurements)
    if raw is None:  # not process 0: lmms-eval gathered the results there
        return None
    scores = {
        task: score
        for task, metrics in raw["results"].items()
        if (score := main_score(task, metrics)) is not None
    }
    efficiency = summarize(network, measurements, batch_size, device, count)
    del network
    # after the run: a matched method knows its setting only once it saw the requests
    label = (
        run.checkpoint_label
        if model.method is None
        else f"{run.checkpoint_label}: {model.method.label}"
    )
    return CheckpointResult(
        checkpoint=str(checkpoint),
        label=label,
        model_type=model.model_config.model_type,
        retention_ratios=model.retention_ratios,
        scores=scores,
        efficiency=efficiency,
        measurements=measurements,
        answers=_answers(raw.get("samples", {})),
        lmms_eval_results=_plain(raw["results"]),
        method=model.method,
        matched_at=getattr(model, "matched_at", None),
    )


def _simple_evaluate(model, tasks, task_manager, **options) -> dict | None:
    """lmms-eval's run of ``tasks`` on ``model``; data that cannot be fetched is a UserError."""
    from lmms_eval.evaluator import simple_evaluate

    try:
        return simple_evaluate(
            model=model,
            tasks=list(tasks),
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=1000,  # mean metrics get their analytic stderr; no resampling
            verbosity="WARNING",
            **options,
        )
    except (
        Exception
    ) as err:  # datasets' errors arrive wrapped (tenacity's RetryError); bugs re-raise
        cause = _offline_cause(err)
        if cause is None:
            raise
        raise UserError(
            f"cannot fetch the data of {', '.join(tasks)}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''} "
            "(lmms-eval's benchmarks download from the Hugging Face Hub: check the network, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and HF_TOKEN)"
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean "the data could not be fetched" (network, Hub, login)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub import errors as hub
    except ImportError:
        hub = None
    names = (
        "HfHubHTTPError",
        "LocalTokenNotFoundError",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
    )
    errors.extend(getattr(hub, name) for name in names if hasattr(hub, name))
    try:
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:
        pass
    else:
        errors.append(DatasetNotFoundError)
    try:
        import httpx
    except ImportError:
        pass
    else:
        errors.append(httpx.TransportError)  # ConnectError, ConnectTimeout, ReadTimeout, ...
    try:
        import requests
    except ImportError:
        pass
    else:
        errors.extend([requests.exceptions.ConnectionError, requests.exceptions.Timeout])
    return tuple(errors)


def _offline_cause(err: BaseException) -> BaseException | None:
    """The network / Hub error behind ``err``, if that is what stopped the run."""
    errors = _network_errors()
    return next((error for error in _chain(err) if isinstance(error, errors)), None)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def main_score(task: str, metrics: dict) -> TaskScore | None:
    """The task's main metric from lmms-eval's results (None for a group without its own)."""
    numeric = {
        key: value
        for key, value in metrics.items()
        if "," in key and "_stderr" not in key and _is_number(value)
    }
    if not numeric:
        return None
    wanted = MAIN_METRICS.get(task)
    key = next((k for k in numeric if wanted and k.split(",", 1)[0] == wanted), next(iter(numeric)))
    metric, filter_name = key.split(",", 1)
    stderr = metrics.get(f"{metric}_stderr,{filter_name}")
    return TaskScore(
        metric=metric,
        value=float(numeric[key]),
        stderr=float(stderr) if _is_number(stderr) else None,
    )


def _is_number(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _mean_crops(measurements: list[SampleMeasurement]) -> int | None:
    """The samples' mean crops through the tower where a method counts its tokens by crop
    (VisionZip), at least one where any sample has an image; None: the count's own (the family's
    largest layout for a given V)."""
    crops = [m.vision_crops for m in measurements]
    if any(c is None for c in crops):
        return None
    mean = sum(crops) / len(crops)
    return max(round(mean), 1) if mean > 0 else 0


def summarize(
    network, measurements: list[SampleMeasurement], batch_size: int, device: str, count: str
) -> Efficiency | None:
    """The efficiency rows of one checkpoint (None when nothing was measured); ``network`` is
    the evaluated HF model."""
    if not measurements:
        return None
    n = len(measurements)
    mean_vision = sum(m.vision_tokens for m in measurements) / n
    mean_text = sum(m.text_tokens for m in measurements) / n
    mean_prefix = sum(m.prefix_text_tokens for m in measurements) / n
    flops = count_flops_for_model(
        network,
        vision_tokens=round(mean_vision),
        text_tokens=round(mean_text),
        count=count,
        prefix_text_tokens=round(mean_prefix),  # only read when text competes too (gamma-MoD)
        vision_crops=_mean_crops(measurements),
    )
    return Efficiency(
        samples=n,
        batch_size=batch_size,
        device=device,
        mean_vision_tokens=mean_vision,
        mean_text_tokens=mean_text,
        flops_count=count,
        tflops=flops.tflops,
        dense_tflops=flops.baseline_tflops,
        kv_cache_bytes=sum(m.kv_cache_bytes for m in measurements) / n,
        dense_kv_cache_bytes=sum(m.dense_kv_cache_bytes for m in measurements) / n,
        prefill_latency_s=sum(m.prefill_s for m in measurements) / n,
        end_to_end_latency_s=sum(m.end_to_end_s for m in measurements) / n,
        peak_memory_bytes=max(m.peak_memory_bytes for m in measurements),
        memory_kind=measurements[0].memory_kind,
        processes=world_size(),
    )


def _answers(samples: dict) -> dict[str, list[dict]]:
    answers = {}
    for task, logged in samples.items():
        rows = []
        for sample in logged:
            response = sample.get("filtered_resps") or sample.get("resps")
            while isinstance(response, list) and len(response) == 1:
                response = response[0]
            rows.append(
                {
                    "doc_id": sample["doc_id"],
                    "target": _plain(sample.get("target")),
                    "answer": _plain(response),
                }
            )
        answers[task] = rows
    return answers


def _plain(value):
    """JSON-ready copy: numpy numbers to floats, tuples to lists, others to strings."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if _is_number(value):
        return float(value)
    if isinstance(value, float):  # nan / inf
        return None
    return str(value)


def report_to_json(report: EvalReport) -> dict:
    """The eval.json object: the provenance header (schema, versions, time, command), then the run."""
    checkpoints = []
    for result in report.checkpoints:
        checkpoints.append(
            {
                "checkpoint": result.checkpoint,
                "label": result.label,
                "model_type": result.model_type,
                "retention_ratios": result.retention_ratios,
                "method": result.method.to_dict() if result.method is not None else None,
                "method_label": result.method.label if result.method is not None else None,
                "matched_at": result.matched_at,
                "scores": {task: asdict(score) for task, score in result.scores.items()},
                "efficiency": result.efficiency.to_dict() if result.efficiency else None,
                "lmms_eval_results": result.lmms_eval_results,
                "answers": result.answers,
                "measurements": [m.to_dict() for m in result.measurements],
            }
        )
    return {
        **report_header(EVAL_SCHEMA_VERSION),
        "tasks": report.tasks,
        "limit": report.limit,
        "batch_size": report.batch_size,
        "device": report.device,
        "dtype": report.dtype,
        "checkpoints": checkpoints,
    }


def lmms_eval_dir_for(output: str | Path) -> Path:
    """Where ``pmod eval --output FILE.json`` keeps lmms-eval's own files: FILE_lmms_eval/ beside it."""
    output = Path(output)
    return output.parent / f"{output.stem}_lmms_eval"


def check_output_path(path: str | Path) -> None:
    """Refuse, before hours of evaluation, an ``--output`` the report could not be written to:
    a directory, or a parent that is a file or a directory this process cannot write in."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"--output {path} is a directory; give a file name, e.g. {path / 'eval.json'}"
        )
    existing = path.absolute().parent
    while not existing.exists():  # the first existing ancestor; the rest is created when writing
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--output {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: cannot write in {existing} (permission denied)")
    files = lmms_eval_dir_for(path)
    if files.exists() and not files.is_dir():
        raise UserError(
            f"--output {path}: {files} (where lmms-eval's own files go) is a file, not a directory"
        )


def write_json_atomically(data: dict, path: str | Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename;
    an OSError (disk full, permissions, a file where a directory should be) is a UserError."""
    path = Path(path)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
        )
    except OSError as err:
        raise UserError(f"cannot write the report to {path}: {err.strerror or err}") from None
    try:
        os.fchmod(handle, _new_file_mode())  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
        os.replace(temporary, path)  # readers see the old file or the whole new one
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write the report to {path}: {err.strerror or err}") from None
        raise
    return path


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (0644 under umask 022)."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask
