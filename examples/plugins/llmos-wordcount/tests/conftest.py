"""Run the tests from a source checkout, without installing the plugin first.

``src/`` goes on ``sys.path`` for this process, and on ``PYTHONPATH`` for the processes the
``llmos_kernel`` fixture starts (the kernel, its workers and the CLI are separate processes, and
``sys.path`` does not travel). The test module's ``@pytest.mark.llmos(plugins=[...])`` marker
then tells the kernel to load ``llmos_wordcount`` although no entry point names it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")

if SRC not in sys.path:
    sys.path.insert(0, SRC)
_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if SRC not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *_paths])
