"""llmos-wordcount: an example llmos plugin that counts the words in text files.

It registers:

* the job kind ``wordcount`` (parameters :class:`WordcountParams`; its runner,
  :class:`llmos_wordcount.runner.WordcountRunner`, is named by a ``"module:Class"`` string so
  that only the worker that runs the job imports it);
* the message type ``wordcount.file`` (:class:`WordcountFile`), one event per counted file;
* the CLI command ``llmos wordcount PATH`` (in :mod:`llmos_wordcount.cli`, imported only when
  ``llmos_register_commands`` is called: by the CLI, and by the kernel to list command names).

This module is imported by the kernel, by every worker and by the CLI, so it stays light: the
``llmos`` SDK and the standard library, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llmos

#: The llmos plugin API versions this plugin works with (``llmos.PLUGIN_API`` must be in range).
LLMOS_API = ">=1,<2"

__version__ = "0.1.0"


@dataclass(frozen=True)
class WordcountParams:
    """The parameters of a ``wordcount`` job (validated by the kernel at submit)."""

    path: str = llmos.param(
        help="A text file, or a directory of text files (a relative path is taken from where "
        "you submit: the kernel makes it absolute).",
        path=True,
    )
    glob: str = llmos.param(
        "*.txt", help="Which files of a directory to count (e.g. '*.md', '**/*.txt')."
    )
    encoding: str = llmos.param("utf-8", help="The text encoding of the files.")


@llmos.message("wordcount.file")
@dataclass(frozen=True, slots=True, kw_only=True)
class WordcountFile:
    """One file counted: sent as ``job.<id>.file`` events, one per file, in order."""

    path: str
    words: int


KIND = llmos.JobKind(
    "wordcount",
    runner="llmos_wordcount.runner:WordcountRunner",
    params=WordcountParams,
    resources=llmos.Resources(cpus=1.0),
    help="Count the words (whitespace-separated) in a text file or a directory of text files.",
)


@llmos.hookimpl
def llmos_register_job_kinds(register: Any) -> None:
    register(KIND)


@llmos.hookimpl
def llmos_register_message_types(register: Any) -> None:
    register(WordcountFile)


@llmos.hookimpl
def llmos_register_commands(register: Any) -> None:
    from llmos_wordcount.cli import wordcount  # click and the command: only when asked for

    register(wordcount)


__all__ = [
    "KIND",
    "LLMOS_API",
    "WordcountFile",
    "WordcountParams",
    "llmos_register_commands",
    "llmos_register_job_kinds",
    "llmos_register_message_types",
]
