"""``python -m llmos.kernel.cli``: the same as the ``llmos`` command."""

from llmos.kernel.cli import main

main()
