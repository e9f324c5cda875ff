"""``python -m pmod_cli.cli`` (what torchrun and the deepspeed launcher run): the ``pmod`` command."""

from . import main

main()
