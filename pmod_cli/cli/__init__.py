"""The ``pmod`` command line: parses arguments and calls into the package, nothing more.

``app.py`` builds the Typer app and mounts one module per command group, in pipeline order:

    convert.py    pmod convert
    data.py       pmod data prepare
    train.py      pmod recipes, pmod pretrain, pmod sft
    evaluate.py   pmod eval, pmod chat
    flops.py      pmod flops
    visualize.py  pmod visualize
    demo.py       pmod demo
    arank.py      pmod arank

``options.py`` declares the flags several commands share (``Annotated`` aliases); a command's own
flags are aliases above it in its module. ``output.py`` writes the ``error:`` / ``warning:``
lines. Adding a command: a function in its group's module, one ``app.command()`` line in
``app.py`` and its place in ``app.PIPELINE``.

Start-up stays light: ``pmod --help``, ``--version``, shell completion and argument errors import
typer and this package only. The function-local imports below are there for that reason alone
(each loads torch or rich), and are the only ones in the package:
    app.py        --version: provenance, runtime
    convert.py    model.loading
    data.py       data.prepare
    train.py      training.recipe (pmod recipes), training.stages
    evaluate.py   evaluation.run, model.methods, evaluation.report, rich; evaluation.chat
    flops.py      efficiency.plan, efficiency.plot, efficiency.report
    visualize.py  visualization.visualize, rich
    demo.py       demo.server
    arank.py      analysis.arank, analysis.report
"""

from .app import app, main

__all__ = ["app", "main"]
