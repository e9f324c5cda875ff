"""`pmod flops --video-frames` on a LLaVA-OneVision preset. The commands on OneVision checkpoints
(eval with video and several images, convert, arank) run for every video family in
test_family_commands.py."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pmod_cli.cli import app


def test_flops_counts_a_video_from_the_cli():
    result = CliRunner().invoke(
        app, ["flops", "--model", "llava-onevision-qwen2-0.5b", "--video-frames", "32", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["vision_tokens"] == 32 * 196 + 1 and plan["vision_crops"] == 32
