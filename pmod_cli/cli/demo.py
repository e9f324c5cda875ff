"""``pmod demo``: a local web page to ask a checkpoint about an image."""

from pathlib import Path
from typing import Annotated

import typer

from .options import Device, MaxNewTokens, method_option

# flags of pmod demo alone
Checkpoint = Annotated[
    Path | None,
    typer.Argument(
        metavar="CHECKPOINT",
        help="p-MoD checkpoint directory (default: the tiny default's runs/tiny/sft).",
    ),
]
Host = Annotated[
    str,
    typer.Option(
        "--host",
        metavar="ADDRESS",
        help="Address to listen on (0.0.0.0: every interface).",
    ),
]
Port = Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port to listen on.")]
DemoMethods = Annotated[
    list[str] | None,
    method_option("Ways to run a request offered side by side (default: pmod,dense). "),
]


def demo(
    checkpoint: Checkpoint = None,
    host: Host = "127.0.0.1",
    port: Port = 7860,
    method: DemoMethods = None,
    max_new_tokens: MaxNewTokens = 256,
    device: Device = None,
) -> None:
    """A local web page: ask about an image, watch the answer stream, the patches each layer kept and the costs."""
    from ..demo.server import serve_until_interrupted, start_demo

    server = start_demo(
        checkpoint,
        host=host,
        port=port,
        methods=method,
        device=device,
        max_new_tokens=max_new_tokens,
    )
    serve_until_interrupted(
        server, on_ready=lambda: typer.echo(f"pmod demo: serving {server.url} (Ctrl-C stops it)")
    )
