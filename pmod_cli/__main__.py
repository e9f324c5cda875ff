"""``python -m pmod_cli``: the same as the ``pmod`` command."""

from .cli import main

main()
