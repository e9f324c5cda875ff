"""``pmod demo``: the page answers as ``pmod chat`` answers, shows the routing ``pmod visualize``
draws for that very prefill, and the costs ``pmod chat`` measures; the dense switch runs the same
weights dense; the server refuses every file but uploads; a real browser sees all of it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import random_image, randomize_routers, save_checkpoint, tiny_model

from pmod_cli import PMoDConfig, apply_fastv, apply_pmod, apply_random
from pmod_cli.cli import main
from pmod_cli.data.prompts import build_prompt, encode
from pmod_cli.demo.engine import DemoEngine, MethodRun
from pmod_cli.demo.methods import select_methods
from pmod_cli.demo.panels import (
    FIGURE_DPI,
    efficiency_cells,
    efficiency_table,
    matrix_image,
    overlay_figure,
    overlay_image,
)
from pmod_cli.efficiency.flops import count_flops_for_model
from pmod_cli.efficiency.report import percent
from pmod_cli.errors import UserError
from pmod_cli.model.families.llava import llava_patch_boxes
from pmod_cli.model.loading import load_checkpoint
from pmod_cli.visualization.figure import PADDING_NOTE
from pmod_cli.visualization.selection import LayerSelection, TokenSelection, select_tokens

# gradio 6's queue still uses two pandas options that pandas 3 deprecates
pytestmark = [
    pytest.mark.xdist_group("demo"),  # one worker starts the server and builds the engine once
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
QUESTION = "what colour is the square?"
MAX_NEW_TOKENS = 8
RATIOS = [1.0, 0.5, 0.25]  # 16 vision tokens: layers keep 16, 8, 4
CHROMIUM = os.environ.get("PMOD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A p-MoD checkpoint and the plain HF model with the same weights (same seed, no routers)."""
    root = tmp_path_factory.mktemp("demo")
    dense_model, dense_processor = tiny_model(layout="llava", layers=3)
    dense = save_checkpoint(dense_model, dense_processor, root / "dense")
    model, processor = tiny_model(layout="llava", layers=3)
    apply_pmod(model, PMoDConfig(ratios=RATIOS))
    randomize_routers(model)
    pmod = save_checkpoint(model, processor, root / "pmod")
    image = root / "image.png"
    random_image(70, 56, seed=5).save(image)
    not_an_image = root / "notes.png"  # an image's name, text inside
    not_an_image.write_text("not a picture\n")
    return {"dense": dense, "pmod": pmod, "image": image, "not_an_image": not_an_image}


def picture(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def greedy(checkpoint, image_path, question=QUESTION, prepare=lambda model: model):
    """The answer and prompt length of ``generate`` on the prompt every command builds (by the
    loaded model after ``prepare``)."""
    model, processor = load_checkpoint(checkpoint)
    model = prepare(model)
    prompt = build_prompt(processor, question, 1, "vicuna_v1")
    inputs = encode(processor, [prompt], [picture(image_path)], model)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    text = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return text, int(inputs["attention_mask"].sum()), int(new_tokens.numel())


@pytest.fixture(scope="module")
def expected(checkpoints):
    """What the page must show, computed without the demo: greedy answers, the routing as
    ``pmod visualize`` records it, the FLOPs count of ``pmod flops``."""
    answer, prompt_tokens, generated = greedy(checkpoints["pmod"], checkpoints["image"])
    dense_answer, _, dense_generated = greedy(checkpoints["dense"], checkpoints["image"])
    model, processor = load_checkpoint(checkpoints["pmod"])
    selection = select_tokens(model, processor, picture(checkpoints["image"]), QUESTION)
    text_tokens = prompt_tokens - 16
    return {
        "answer": answer,
        "generated": generated,
        "dense_answer": dense_answer,
        "dense_generated": dense_generated,
        "selection": selection,
        "text_tokens": text_tokens,
        "flops": count_flops_for_model(model, vision_tokens=16, text_tokens=text_tokens),
        # every layer holds the text; layers hold 16, 8, 4 vision tokens
        "kv_share": (3 * text_tokens + 16 + 8 + 4) / (3 * (text_tokens + 16)),
    }


@pytest.fixture(scope="module")
def engine(checkpoints):
    model, processor = load_checkpoint(checkpoints["pmod"])
    return DemoEngine(model, processor, select_methods(), max_new_tokens=MAX_NEW_TOKENS)


def run(engine, image_path, name) -> tuple[list[str], MethodRun]:
    updates = list(engine.stream(picture(image_path), QUESTION, name))
    *pieces, finished = updates
    assert isinstance(finished, MethodRun) and all(isinstance(piece, str) for piece in pieces)
    return pieces, finished


# ---- the engine: no web server -----------------------------------------------------------


def test_pmod_answer_streams_and_shows_its_own_prefill_routing(engine, checkpoints, expected):
    pieces, finished = run(engine, checkpoints["image"], "pmod")
    assert finished.answer.text == expected["answer"]
    # streamed: growing prefixes of the answer, the last one the answer itself
    assert len(pieces) >= 2 and pieces[-1].strip() == expected["answer"]
    assert all(expected["answer"].startswith(piece.rstrip()) for piece in pieces)
    # the routing of the answer's prefill is the one `pmod visualize` records for the prompt
    shown, reference = finished.selection.layers, expected["selection"].layers
    assert [layer.kept_count for layer in shown] == [16, 8, 4]
    for ours, theirs in zip(shown, reference, strict=True):
        np.testing.assert_array_equal(ours.kept, theirs.kept)
    assert finished.selection.boxes == expected["selection"].boxes


def test_dense_switch_runs_the_same_weights_dense_and_leaves_pmod_alone(
    engine, checkpoints, expected
):
    pmod_model, dense_model = engine.models["pmod"], engine.models["dense"]
    dense_parameters = dict(dense_model.named_parameters())
    shared = [
        name
        for name, tensor in pmod_model.named_parameters()
        if dense_parameters.get(name) is tensor
    ]
    assert len(shared) == len(dense_parameters)  # every weight shared, none copied
    assert dense_model.retention_ratios == [1.0, 1.0, 1.0]
    assert not any("router" in name for name in dense_parameters)

    _, dense = run(engine, checkpoints["image"], "dense")
    # the untouched HF model with these weights answers the same
    assert dense.answer.text == expected["dense_answer"]
    assert all(layer.kept_count == 16 for layer in dense.selection.layers)
    cells = efficiency_cells(dense)
    assert cells["tflops"].endswith("(100.0% of dense)")
    assert cells["kv_cache"].endswith("(100.0% of dense)")
    assert cells["generated"] == str(expected["dense_generated"])

    _, again = run(engine, checkpoints["image"], "pmod")  # after the dense run: p-MoD as before
    assert pmod_model.retention_ratios == RATIOS
    assert again.answer.text == expected["answer"]
    cells = efficiency_cells(again)
    assert cells["prompt_tokens"] == f"16 vision + {expected['text_tokens']} text"
    assert cells["kv_cache"].endswith(f"({percent(expected['kv_share'])} of dense)")
    flops = expected["flops"]
    assert (
        cells["tflops"]
        == f"{flops.tflops:.3g} ({percent(flops.tflops / flops.baseline_tflops)} of dense)"
    )
    table = efficiency_table([again, dense])
    assert table.index('data-method="pmod"') < table.index('data-method="dense"')


def test_llava_next_routing_shown_is_the_prefill_routing(tmp_path):
    """Two views and row-newline tokens: the demo's reading of the routing is visualize's."""
    model, processor = tiny_model(layout="llava_next", layers=3)
    apply_pmod(model, PMoDConfig(ratios=[1.0, 0.5, 0.25]))
    randomize_routers(model)
    image = random_image(90, 60, seed=3)
    engine = DemoEngine(model, processor, select_methods(["pmod"]), max_new_tokens=2)
    *_, finished = engine.stream(image, QUESTION, "pmod")
    reference = select_tokens(model, processor, image, QUESTION)
    assert finished.selection.boxes == reference.boxes and None in reference.boxes
    for ours, theirs in zip(finished.selection.layers, reference.layers, strict=True):
        np.testing.assert_array_equal(ours.kept, theirs.kept)
    assert finished.selection.layers[2].kept_count == len(reference.boxes) // 4
    assert overlay_image(finished.selection, 2).size == overlay_image(reference, 2).size


def test_method_selector():
    assert [method.name for method in select_methods()] == ["pmod", "dense"]
    assert [method.name for method in select_methods(["dense,pmod", "dense"])] == ["dense", "pmod"]
    assert [method.name for method in select_methods(["random,fastv"])] == ["random", "fastv"]
    chosen = select_methods(["fastv:layer=1,ratio=0.25", "pool:tokens=4"])
    assert [method.label for method in chosen] == ["FastV K=1 R=0.25", "pool 4"]
    with pytest.raises(UserError, match=r"pool needs tokens=N \(pool:tokens=64\)"):
        select_methods(["pool"])
    assert select_methods(["visionzip"])[0].label == "VisionZip 191+30"  # its defaults run
    assert select_methods(["sparsevlm:scale=0.5"])[0].label == "SparseVLM 192 x0.5"
    with pytest.raises(UserError, match="one setting per method; --method gives fastv twice"):
        select_methods(["fastv", "fastv:layer=3"])
    with pytest.raises(UserError, match="unknown method 'zigzag'"):
        select_methods(["zigzag"])


def test_baselines_answer_as_their_python_entry_points_on_shared_weights(checkpoints):
    """FastV and random in the switch: the answer and kept tokens of ``apply_fastv`` /
    ``apply_random`` on the checkpoint, their own FLOPs count, the p-MoD model untouched."""
    model, processor = load_checkpoint(checkpoints["pmod"])
    engine = DemoEngine(
        model, processor, select_methods(["fastv", "random", "pmod"]), MAX_NEW_TOKENS
    )
    for name, prepare, kept in (
        ("fastv", lambda m: apply_fastv(m, layer=2, ratio=0.5), [16, 16, 8]),
        ("random", lambda m: apply_random(m, seed=0), [16, 8, 4]),
    ):
        assert all(
            p is q
            for p, q in zip(engine.models[name].parameters(), model.parameters(), strict=True)
        )
        _, finished = run(engine, checkpoints["image"], name)
        answer, prompt_tokens, _ = greedy(
            checkpoints["pmod"], checkpoints["image"], prepare=prepare
        )
        assert finished.answer.text == answer
        assert [layer.kept_count for layer in finished.selection.layers] == kept
        reference = count_flops_for_model(
            prepare(load_checkpoint(checkpoints["pmod"])[0]),
            vision_tokens=16,
            text_tokens=prompt_tokens - 16,
        )
        assert finished.answer.flops.tflops == pytest.approx(reference.tflops)
    assert model.retention_ratios == RATIOS and model.token_method.name == "pmod"


# ---- the page's function: refused requests, the overlay's legend ------------------------


def refusals(checkpoints) -> list[tuple[str, tuple, str]]:
    """(case, the page's inputs: image file, question, ticked methods; the status line's words)."""
    from pmod_cli.demo.app import NO_IMAGE, NO_METHOD, NO_QUESTION, unreadable_image

    image, not_an_image = str(checkpoints["image"]), str(checkpoints["not_an_image"])
    return [
        ("no image", (None, QUESTION, ["pmod"]), NO_IMAGE),
        ("not an image", (not_an_image, QUESTION, ["pmod"]), unreadable_image("notes.png")),
        ("no question", (image, "  ", ["pmod"]), NO_QUESTION),
        ("no method", (image, QUESTION, []), NO_METHOD),
    ]


def file_data(path) -> dict | None:
    """The image input's value as the page sends it (unprocessed: the file is opened later)."""
    return None if path is None else {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def page_function(app):
    """The function the page's Ask button calls (with the inputs as sent), and its outputs by
    element id."""
    (answer,) = [fn for fn in app.fns.values() if fn.api_name == "answer"]
    return answer.fn, {getattr(block, "elem_id", None): block for block in answer.outputs}


@pytest.mark.slow
def test_a_refused_request_says_why_once_and_leaves_the_outputs_alone(engine, checkpoints):
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'pmod-cli[demo]'")
    from pmod_cli.demo.app import build_app

    answer, outputs = page_function(build_app(engine, "test"))
    status = outputs["status"]
    cases = refusals(checkpoints)
    assert len({message for *_, message in cases}) == len(cases)  # each says what is wrong
    for case, (image, *inputs), message in cases:
        updates = list(answer(file_data(image), *inputs, 1))
        # one update, the status line alone: no output box is touched, none shows "Error"
        assert updates == [{status: message}], case
    # the next request that can run clears the status line with its first update
    updates = list(answer(file_data(checkpoints["image"]), QUESTION, ["pmod"], 1))
    assert updates[0][status] == ""
    assert all(status not in update for update in updates[1:])
    assert updates[-1][outputs["answer-pmod"]] == updates[-2][outputs["answer-pmod"]] != ""


def padded_selection(height: int, width: int) -> TokenSelection:
    """LLaVA-1.5's pad-to-square on a ``width`` x ``height`` picture: 16 tokens, layer 1 keeps 6."""
    boxes = llava_patch_boxes(
        height, width, patch_size=14, size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56}, pad_to_square=True,
    )  # fmt: skip
    kept = np.isin(np.arange(16), [0, 1, 5, 6, 13, 15])
    layers = [
        LayerSelection(0, 1.0, np.ones(16, dtype=bool), None),
        LayerSelection(1, 0.4, kept, np.linspace(0.9, 1.1, 16)),
    ]
    image = np.asarray(random_image(width, height, seed=2))
    return TokenSelection([image], boxes, layers)


@pytest.mark.parametrize("height, width", [(56, 168), (168, 56), (56, 70), (56, 56)])
def test_the_overlay_legend_fits_inside_its_picture(height, width):
    """Every line of the legend above the one-panel overlay, the padding note included, is drawn
    inside the figure (the page shows the picture whole: what lies outside is cut)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = overlay_figure(padded_selection(height, width), 1)
    figure.set_dpi(FIGURE_DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    (legend,) = figure.texts
    assert ("grey band" in legend.get_text()) == (height != width)
    if height != width:  # wrapped, never cut: the whole note is there
        assert PADDING_NOTE in " ".join(legend.get_text().split())
    frame = figure.bbox
    for text in [legend, *(axes.title for axes in figure.axes)]:
        extent = text.get_window_extent(canvas.get_renderer())
        assert frame.x0 <= extent.x0 and extent.x1 <= frame.x1, text.get_text()
        assert frame.y0 <= extent.y0 and extent.y1 <= frame.y1, text.get_text()
    assert overlay_image(padded_selection(height, width), 1).size == canvas.get_width_height()


# ---- the command: errors before any server starts ----------------------------------------


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["pmod", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_taken_port_is_one_error_line(checkpoints, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(monkeypatch, capsys, "demo", checkpoints["pmod"], "--port", port)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is taken (another pmod demo?); pass --port with a free one"
    ]


def test_a_bad_checkpoint_is_one_error_line(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(monkeypatch, capsys, "demo", empty, "--port", free_port())
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and str(empty) in line


def test_a_dense_checkpoint_is_refused(checkpoints, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "demo", checkpoints["dense"], "--port", free_port())
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "not a p-MoD one" in line and "pmod convert" in line


def test_the_missing_default_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "demo")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "runs/tiny/sft does not exist" in line
    assert "pmod pretrain recipes/tiny_pretrain.toml && pmod sft recipes/tiny.toml" in line


# ---- the server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoints):
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'pmod-cli[demo]'")
    from pmod_cli.demo.server import start_demo

    running = start_demo(checkpoints["pmod"], port=free_port(), max_new_tokens=MAX_NEW_TOKENS)
    yield running
    running.close()


@pytest.mark.slow
def test_the_server_listens_on_loopback_and_serves_no_file_but_uploads(
    server, checkpoints, tmp_path
):
    import httpx

    assert server.url.startswith("http://127.0.0.1:")
    secret = tmp_path / "secret.png"  # in the temp dir, where Gradio is laxest
    random_image(30, 30, seed=9).save(secret)
    base = server.url.rstrip("/")
    for path in (secret, checkpoints["pmod"] / "config.json", Path("/etc/passwd")):
        response = httpx.get(f"{base}/gradio_api/file={path}")
        assert response.status_code in (403, 404), path
    # the page's one API takes an image by upload only: a server path is refused
    request = {
        "data": [
            {"path": str(secret), "meta": {"_type": "gradio.FileData"}},
            QUESTION,
            ["pmod"],
            1,
        ]
    }
    event = httpx.post(f"{base}/gradio_api/call/answer", json=request).json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/answer/{event}", timeout=60).text
    assert "event: error" in stream and "not uploaded by a user" in stream


def sse_events(text: str) -> list[tuple[str, object]]:
    """(event, data) pairs of a Gradio ``/gradio_api/call`` event stream."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields.get("event"), json.loads(fields.get("data", "null"))))
    return events


@pytest.mark.slow
def test_the_server_streams_the_answer_piece_by_piece(server, checkpoints, expected):
    """Over the wire, as the page receives it: one update per streamed piece, then the answer."""
    import httpx

    base = server.url.rstrip("/")
    with open(checkpoints["image"], "rb") as upload:
        (uploaded,) = httpx.post(
            f"{base}/gradio_api/upload", files={"files": ("image.png", upload, "image/png")}
        ).json()
    request = {
        "data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, QUESTION, ["pmod"], 1]
    }
    event = httpx.post(f"{base}/gradio_api/call/answer", json=request).json()["event_id"]
    events = sse_events(httpx.get(f"{base}/gradio_api/call/answer/{event}", timeout=120).text)
    assert events[-1][0] == "complete"
    # the first output is the p-MoD answer box; a dict marks an output this update leaves alone
    answers = [data[0] for _, data in events if isinstance(data[0], str) and data[0]]
    assert answers[-1] == expected["answer"]
    distinct = list(dict.fromkeys(answers))
    assert len(distinct) >= 2  # a partial answer went out before the whole one
    assert all(expected["answer"].startswith(piece.rstrip()) for piece in distinct)


def upload(base: str, path: Path) -> dict:
    """``path`` uploaded as the page uploads it, as the answer API's image argument."""
    import httpx

    with open(path, "rb") as handle:
        (uploaded,) = httpx.post(
            f"{base}/gradio_api/upload", files={"files": (path.name, handle, "image/png")}
        ).json()
    return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.slow
def test_over_the_wire_a_refused_request_completes_with_its_status_line(server, checkpoints):
    """Through Gradio's own input processing: no image, and an upload that is no image (which
    Gradio's image input would fail on before the page's function ran), complete normally with
    the reason in the status line (the last output) and every other output left alone."""
    import httpx

    from pmod_cli.demo.app import NO_IMAGE, unreadable_image

    base = server.url.rstrip("/")
    for image, message in (
        (None, NO_IMAGE),
        (upload(base, checkpoints["not_an_image"]), unreadable_image("notes.png")),
    ):
        request = {"data": [image, QUESTION, ["pmod"], 1]}
        event = httpx.post(f"{base}/gradio_api/call/answer", json=request).json()["event_id"]
        stream = httpx.get(f"{base}/gradio_api/call/answer/{event}", timeout=60).text
        events = sse_events(stream)
        assert [kind for kind, _ in events] == ["generating", "complete"], stream
        *boxes, _, status = events[-1][1]  # the answers, table and pictures; the slider's state
        assert status == message
        # a dict marks an output this update leaves alone
        assert all(isinstance(box, dict) for box in boxes) and "Error" not in stream


@pytest.mark.slow
def test_the_command_serves_until_told_to_stop_and_leaves_no_files(checkpoints, tmp_path):
    """The real `pmod demo` process: it announces the address once it serves, serves the page on
    loopback, and a plain `kill` stops it cleanly (exit 0, its example files removed)."""
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'pmod-cli[demo]'")
    import httpx

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(repo)}
    command = [
        sys.executable,
        "-m",
        "pmod_cli",
        "demo",
        str(checkpoints["pmod"]),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment
    )
    try:
        announced = process.stdout.readline()
        assert announced == f"pmod demo: serving http://127.0.0.1:{port}/ (Ctrl-C stops it)\n"
        assert list(tmp_path.glob("pmod-demo-*"))  # the example images, while it serves
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "pmod demo" in page.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not list(tmp_path.glob("pmod-demo-*"))


@pytest.fixture(scope="module")
def browser_page():
    playwright_api = pytest.importorskip(
        "playwright.sync_api",
        reason="browser tests need the playwright package (pip install playwright)",
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="pmod-chromium-")
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shown_image(page, selector: str) -> np.ndarray:
    """The pixels the browser fetched for the <img> in ``selector``."""
    source = page.locator(f"{selector} img").get_attribute("src")
    with Image.open(io.BytesIO(page.request.get(source).body())) as image:
        return np.asarray(image.convert("RGB"))


# records every value the answer box takes, polled faster than tokens arrive
WATCH_ANSWER = """() => {
    window.seenAnswers = [];
    const box = document.querySelector('#answer-pmod textarea');
    window.answerWatch = setInterval(() => {
        const last = window.seenAnswers[window.seenAnswers.length - 1];
        if (box.value !== last) window.seenAnswers.push(box.value);
    }, 2);
}"""


OUTPUTS = ("#answer-pmod", "#answer-dense", "#efficiency", "#overlay", "#matrix")


def wait_for_status(page, message: str) -> None:
    """Until the status line shows ``message`` (as its Markdown renders: no * or `)."""
    shown = message.replace("*", "").replace("`", "")
    page.locator("#status", has_text=shown).wait_for(timeout=30_000)
    assert page.locator("#status").inner_text().strip() == shown


@pytest.mark.slow
def test_in_a_browser_a_refused_request_says_why_under_the_button(
    browser_page, server, checkpoints, tmp_path
):
    page = browser_page
    for case, (image, text, chosen), message in refusals(checkpoints):
        page.goto(server.url)
        page.wait_for_selector("#ask")
        if image is not None:
            page.locator("#image input[type=file]").set_input_files(image)
            page.wait_for_selector("#image img")  # the upload has arrived
        page.locator("#question textarea").fill(text)
        if "pmod" not in chosen:
            page.locator("#methods input[name=pmod]").uncheck()
        page.locator("#ask").click()
        wait_for_status(page, message)
        page.screenshot(path=tmp_path / f"{case.replace(' ', '_')}.png", full_page=True)
        # said once, under the button: no output box reads "Error", no error pops up
        for output in OUTPUTS:
            assert "Error" not in page.locator(output).inner_text(), (case, output)
        assert page.locator(".toast-body").count() == 0, case


@pytest.mark.slow
def test_in_a_browser_the_page_answers_and_shows_routing_and_costs(
    browser_page, server, checkpoints, expected, tmp_path, capsys
):
    from pmod_cli.demo.app import NO_IMAGE

    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url)
    page.wait_for_selector("#ask")
    page.locator("#ask").click()  # refused: the answer below clears the status line
    wait_for_status(page, NO_IMAGE)
    page.locator("#image input[type=file]").set_input_files(str(checkpoints["image"]))
    page.locator("#question textarea").fill(QUESTION)
    page.locator("#methods input[name=dense]").check()
    page.wait_for_selector("#image img")  # the upload has arrived
    page.evaluate(WATCH_ANSWER)
    page.locator("#ask").click()
    page.wait_for_selector("#efficiency td[data-method=dense][data-metric=tflops]", timeout=120_000)
    page.wait_for_selector("#overlay img")
    page.screenshot(path=tmp_path / "answered.png", full_page=True)
    assert page.locator("#status").inner_text().strip() == ""

    # the streamed answer: growing prefixes, ending in the model's greedy answer
    seen = [value for value in page.evaluate("window.seenAnswers") if value]
    assert page.locator("#answer-pmod textarea").input_value() == expected["answer"]
    assert seen and seen[-1] == expected["answer"]
    assert all(expected["answer"].startswith(value.rstrip()) for value in seen)
    assert page.locator("#answer-dense textarea").input_value() == expected["dense_answer"]

    # the kept patches of the default layer (1, the first that routes) and the matrix, as
    # `pmod visualize` draws the routing it records for this prompt
    np.testing.assert_array_equal(
        shown_image(page, "#overlay"), np.asarray(overlay_image(expected["selection"], 1))
    )
    np.testing.assert_array_equal(
        shown_image(page, "#matrix"), np.asarray(matrix_image(expected["selection"]))
    )

    def cell(method, metric):
        return page.locator(
            f"#efficiency td[data-method={method}][data-metric={metric}]"
        ).inner_text()

    flops = expected["flops"]
    assert cell("pmod", "prompt_tokens") == f"16 vision + {expected['text_tokens']} text"
    assert (
        cell("pmod", "tflops")
        == f"{flops.tflops:.3g} ({percent(flops.tflops / flops.baseline_tflops)} of dense)"
    )
    assert cell("pmod", "kv_cache").endswith(f"({percent(expected['kv_share'])} of dense)")
    assert cell("pmod", "generated") == str(expected["generated"])
    assert cell("dense", "tflops").endswith("(100.0% of dense)")
    assert cell("dense", "kv_cache").endswith("(100.0% of dense)")
    for method in ("pmod", "dense"):
        assert float(cell(method, "prefill").removesuffix(" s")) > 0
        assert float(cell(method, "end_to_end").removesuffix(" s")) >= float(
            cell(method, "prefill").removesuffix(" s")
        )

    # the slider redraws the overlay for another layer
    before = page.locator("#overlay img").get_attribute("src")
    number = page.locator("#layer input[type=number]")
    number.fill("2")
    number.press("Enter")
    page.wait_for_function(
        "src => document.querySelector('#overlay img').getAttribute('src') !== src", arg=before
    )
    np.testing.assert_array_equal(
        shown_image(page, "#overlay"), np.asarray(overlay_image(expected["selection"], 2))
    )
    page.screenshot(path=tmp_path / "layer2.png", full_page=True)
    # system fonts, no analytics: the page asks nothing of any other host
    outside = [url for url in requested if not url.startswith((server.url, "data:", "blob:"))]
    assert requested and outside == []
    with capsys.disabled():
        print(
            f"\n[pmod demo] {len(seen)} answer states seen while streaming; screenshots in {tmp_path}"
        )
