"""``pmod demo``: check everything a user can get wrong, load the checkpoint, serve the page.

The checkpoint, the methods and the address are checked before the model loads and before any
server starts, so a bad checkpoint or a taken port is one ``error:`` line. The server binds to
127.0.0.1 unless told otherwise and serves nothing but the page, the files it made (example
images, drawings) and the files a visitor uploaded: no ``allowed_paths``, and the checkpoint
directory is blocked outright.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.synthetic import draw_scene, questions, random_scene
from ..errors import UserError
from ..evaluation.chat import DEFAULT_MAX_NEW_TOKENS
from ..model.loading import load_checkpoint, read_model_type
from ..visualization.visualize import DEFAULT_CHECKPOINT, MAKE_DEFAULT_CHECKPOINT
from .engine import DemoEngine
from .methods import select_methods

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EXAMPLE_SEED = 2024
EXAMPLE_COUNT = 3
MAX_UPLOAD = "20mb"


@dataclass
class DemoServer:
    """A running demo: its address, the Gradio app and the engine behind it."""

    url: str
    app: object  # gradio.Blocks
    engine: object  # DemoEngine
    examples_dir: Path

    def close(self) -> None:
        self.app.close()
        shutil.rmtree(self.examples_dir, ignore_errors=True)


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    """The checkpoint to serve: the tiny default's when none is given (it must exist)."""
    if checkpoint is not None:
        return Path(checkpoint)
    if not DEFAULT_CHECKPOINT.exists():
        raise UserError(
            f"no checkpoint given and the tiny default's SFT checkpoint {DEFAULT_CHECKPOINT} does "
            f"not exist; make it with `{MAKE_DEFAULT_CHECKPOINT}` or pass a checkpoint directory"
        )
    return DEFAULT_CHECKPOINT


def check_address_free(host: str, port: int) -> None:
    """A UserError unless a server could listen on ``host:port`` now."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; pass a number from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host} is not an address to listen on ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        # as the web server will: a port left in TIME_WAIT by an earlier run counts as free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is taken (another pmod demo?); pass --port with a free one"
                ) from None
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def write_examples(directory: Path) -> list[tuple[Path, str]]:
    """A few scenes of the tiny default's synthetic set, each with a question it answers."""
    rng = random.Random(EXAMPLE_SEED)
    examples = []
    for index in range(EXAMPLE_COUNT):
        scene = random_scene(rng)
        path = directory / f"example_{index}.png"
        draw_scene(scene).save(path)
        _, question, _ = rng.choice(questions(scene, rng))
        examples.append((path, question))
    return examples


def _title(checkpoint: Path, ratios: list[float]) -> str:
    routed = sum(ratio < 1.0 for ratio in ratios)
    return f"`{checkpoint}` · {routed} of {len(ratios)} decoder layers route (p-MoD)"


def start_demo(
    checkpoint: Path | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    methods: list[str] | None = None,
    device: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> DemoServer:
    """Check, load and start serving in a background thread; ``close()`` the result to stop."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError(
            "pmod demo needs Gradio: pip install 'pmod-cli[demo]' (or pip install gradio)"
        )
    checkpoint = resolve_checkpoint(checkpoint)
    chosen = select_methods(methods)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    read_model_type(checkpoint)  # a UserError for a directory that holds no usable checkpoint
    check_address_free(host, port)
    model, processor = load_checkpoint(checkpoint, device=device, dtype="auto", require_pmod=True)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the server
    from .app import build_app  # imports gradio (the demo extra): checked for above, set up first

    engine = DemoEngine(model, processor, chosen, max_new_tokens)
    # Gradio takes example files from the temp dir
    examples_dir = Path(tempfile.mkdtemp(prefix="pmod-demo-"))
    try:
        app = build_app(engine, _title(checkpoint, engine.ratios), write_examples(examples_dir))
        url = _launch(app, host, port, checkpoint)
    except BaseException:  # a taken port, or Ctrl-C while starting: leave no files behind
        shutil.rmtree(examples_dir, ignore_errors=True)
        raise
    return DemoServer(url, app, engine, examples_dir)


def _launch(app, host: str, port: int, checkpoint: Path) -> str:
    """Start serving in a background thread; the page's address."""
    from .app import THEME  # imports gradio (the demo extra)

    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            share=False,
            quiet=True,
            show_error=True,
            theme=THEME,
            allowed_paths=None,
            blocked_paths=[str(checkpoint.resolve())],
            max_file_size=MAX_UPLOAD,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
        )
    except OSError as err:  # taken since the check
        raise UserError(f"cannot serve on {host}:{port}: {err}") from None
    return url


def serve_until_interrupted(
    server: DemoServer, on_ready: Callable[[], None] = lambda: None
) -> None:
    """Keep serving until Ctrl-C (or a plain ``kill``), then stop the server and remove its files;
    ``on_ready`` runs once both stop it cleanly (to announce the address)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # Gradio's wait loop stops on it

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        on_ready()
        server.app.block_thread()
    except KeyboardInterrupt:  # asked to stop before Gradio's loop was waiting: a clean stop too
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
