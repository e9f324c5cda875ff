"""The page (Gradio Blocks): image and question in, answers streamed, routing and costs beside them.

Element ids (for tests and custom CSS): ``image``, ``question``, ``methods``, ``ask``, ``status``
(under the button: why a request was refused, empty otherwise), ``answer-<method>`` (one box per
method of the switch), ``efficiency`` (a table whose cells carry ``data-method`` and
``data-metric``), ``layer`` (the slider), ``overlay``, ``matrix``.
Inputs are an uploaded (or example) image and text only: no component takes a server path.
A request the page cannot answer (no image, a file that is no image, no question, no method
ticked) is refused with one line in ``status``; the outputs stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from PIL import Image, ImageOps

from .engine import DemoEngine, MethodRun
from .panels import default_layer, efficiency_table, matrix_image, overlay_image

INTRO = (
    "Ask about an image. Each answer is greedy and streamed; the overlay shows which image patches "
    "the chosen decoder layer kept in that answer's prefill (dark: skipped), the matrix shows every "
    "layer, and the table what the request cost against the dense model."
)
# system fonts: the page makes no request outside this server
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
# why a request was refused, shown once under the Ask button
NO_IMAGE = "No image: upload or pick an image first."
NO_QUESTION = "No question: type a question about the image first."
NO_METHOD = "No method ticked: tick at least one way to run the request (*run as*)."


def unreadable_image(name: str) -> str:
    return f"`{name}` is not an image this page can read: upload a picture (PNG, JPEG, WebP, ...)."


class Refused(Exception):
    """A request the page does not run; its message is what the status line says."""


def build_app(
    engine: DemoEngine, title: str, examples: Sequence[tuple[Path, str]] = ()
) -> gr.Blocks:
    """The Blocks app for ``engine``; ``examples`` are (image file, question) pairs to pick."""
    num_layers = len(engine.ratios)
    # uploads are deleted a day after they arrive (checked hourly)
    with gr.Blocks(title="pmod demo", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f"## pmod demo · {title}\n{INTRO}")
        selection = gr.State(None)  # the first method's TokenSelection, for the slider
        with gr.Row():
            with gr.Column():
                image, question, methods, ask, status = _request_inputs(engine, examples)
            with gr.Column():
                answers, efficiency = _answer_outputs(engine)
        with gr.Row():
            layer, overlay, matrix = _routing_outputs(engine)

        def answer(upload, text, chosen, layer_index):
            shown = _clamp(layer_index, num_layers)
            for update in answer_request(engine, uploaded_path(upload), text, chosen, shown):
                yield _outputs(update, answers, efficiency, overlay, matrix, selection, status)

        # the status line last: the API's outputs start with the answers, as before
        outputs = [*answers.values(), efficiency, overlay, matrix, selection, status]
        for trigger, api_name in ((ask.click, "answer"), (question.submit, False)):
            trigger(
                answer,
                inputs=[image, question, methods, layer],
                outputs=outputs,
                api_name=api_name,
                concurrency_limit=1,  # one request at a time, whichever way it was sent
                concurrency_id="answer",
                # the inputs as sent: Gradio's image preprocessing would open the upload and turn
                # a file that is no image into a bare "Error" in every output before `answer` ran
                preprocess=False,
            )

        def redraw(shown_selection, layer_index):
            if shown_selection is None:  # nothing asked yet
                return None
            return overlay_image(shown_selection, _clamp(layer_index, num_layers))

        layer.change(redraw, inputs=[selection, layer], outputs=[overlay], api_name=False)
    return app


def _request_inputs(engine: DemoEngine, examples: Sequence[tuple[Path, str]]):
    image = gr.Image(
        type="filepath",  # the answer takes the upload unprocessed: open_picture opens it
        sources=["upload", "clipboard"],
        label="picture to ask about",
        elem_id="image",
    )
    question = gr.Textbox(label="question", lines=1, elem_id="question")
    methods = gr.CheckboxGroup(
        choices=[(method.label, method.name) for method in engine.methods],
        value=[engine.methods[0].name],
        label="run as (side by side)",
        elem_id="methods",
    )
    ask = gr.Button("Ask", variant="primary", elem_id="ask")
    status = gr.Markdown("", elem_id="status")
    if examples:
        gr.Examples(
            examples=[[str(path), text] for path, text in examples],
            inputs=[image, question],
            label="examples",
        )
    return image, question, methods, ask, status


def _answer_outputs(engine: DemoEngine):
    answers = {
        method.name: gr.Textbox(
            label=f"answer · {method.label}",
            lines=3,
            interactive=False,
            elem_id=f"answer-{method.name}",
        )
        for method in engine.methods
    }
    return answers, gr.HTML(elem_id="efficiency")


def _routing_outputs(engine: DemoEngine):
    num_layers = len(engine.ratios)
    with gr.Column():
        layer = gr.Slider(
            0,
            num_layers - 1,
            value=default_layer(engine.ratios),
            step=1,
            label=f"decoder layer (0-{num_layers - 1})",
            elem_id="layer",
        )
        overlay = gr.Image(
            label="kept patches of the layer",
            show_label=False,  # the drawings carry their own titles
            type="pil",
            format="png",
            interactive=False,
            elem_id="overlay",
        )
    matrix = gr.Image(
        label="layers x vision tokens",
        show_label=False,
        type="pil",
        format="png",
        interactive=False,
        elem_id="matrix",
    )
    return layer, overlay, matrix


def answer_request(engine: DemoEngine, picture, text: str, chosen: Sequence[str], layer: int):
    """The page's updates for one request, as dicts keyed by ``method:<name>`` (answer so far),
    ``efficiency``, ``overlay``, ``matrix``, ``selection`` and ``status``. ``picture`` is an image
    or an image file's path. A refused request is one update, ``status`` alone (why); an answered
    one clears ``status`` with its first update."""
    try:
        image, question, names = check_request(engine, picture, text, chosen)
    except Refused as refused:
        yield {"status": str(refused)}
        return
    yield {
        **{f"method:{method.name}": "" for method in engine.methods},
        "efficiency": "",
        "overlay": None,
        "matrix": None,
        "selection": None,
        "status": "",
    }
    runs: list[MethodRun] = []
    for name in names:
        for update in engine.stream(image, question, name):
            if isinstance(update, str):
                yield {f"method:{name}": update}
                continue
            runs.append(update)
            finished = {f"method:{name}": update.answer.text, "efficiency": efficiency_table(runs)}
            if len(runs) == 1:  # the pictures show the first method's routing
                finished.update(
                    overlay=overlay_image(update.selection, layer),
                    matrix=matrix_image(update.selection),
                    selection=update.selection,
                )
            yield finished


def check_request(
    engine: DemoEngine, picture, text: str | None, chosen: Sequence[str] | None
) -> tuple[Image.Image, str, list[str]]:
    """The image, the question and the methods to run, in the switch's order; ``Refused`` (with
    the status line's words) for a request the page does not run, checked in the page's order."""
    if picture is None:
        raise Refused(NO_IMAGE)
    image = open_picture(picture)
    if not text or not text.strip():
        raise Refused(NO_QUESTION)
    names = [method.name for method in engine.methods if method.name in (chosen or ())]
    if not names:
        raise Refused(NO_METHOD)
    return image, text.strip(), names


def uploaded_path(upload: dict | None) -> str | None:
    """The file of the image input's unprocessed value (the ``FileData`` of an upload, which
    Gradio has checked to be one, or of an example); None without one."""
    return None if upload is None else upload.get("path")


def open_picture(picture) -> Image.Image:
    """An RGB image from an image or an image file's path (turned upright as its EXIF says, as
    Gradio does); ``Refused`` when the file is no image PIL reads."""
    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    try:
        with Image.open(picture) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise Refused(unreadable_image(Path(picture).name)) from err


def _outputs(update: dict, answers: dict, efficiency, overlay, matrix, selection, status) -> dict:
    components = {f"method:{name}": box for name, box in answers.items()}
    components.update(
        efficiency=efficiency, overlay=overlay, matrix=matrix, selection=selection, status=status
    )
    return {components[key]: value for key, value in update.items()}


def _clamp(layer_index, num_layers: int) -> int:
    # the slider keeps to its range; a hand-made API call need not
    return min(max(int(layer_index or 0), 0), num_layers - 1)
