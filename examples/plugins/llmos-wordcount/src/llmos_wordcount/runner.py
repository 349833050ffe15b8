"""The ``wordcount`` runner: imported only in the worker process that runs a ``wordcount`` job.

A real plugin keeps its heavy imports (torch, transformers, ...) in a module like this one, so
that the kernel and the CLI, which import the plugin's top-level module, never pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llmos
from llmos_wordcount import WordcountFile


class WordcountRunner(llmos.Runner):
    """Finds the files in ``setup``, counts them one by one in ``run``."""

    def setup(self, ctx: llmos.JobContext) -> None:
        self.root = Path(ctx.params.path).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"wordcount: no such file or directory: {self.root}")
        if self.root.is_dir():
            self.files = sorted(p for p in self.root.glob(ctx.params.glob) if p.is_file())
            if not self.files:
                raise ValueError(
                    f"wordcount: no files matching {ctx.params.glob!r} in directory {self.root}"
                )
        else:
            self.files = [self.root]
        ctx.log.info("counting", path=str(self.root), files=len(self.files))

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        total_files = len(self.files)
        words = files = 0
        for i, file in enumerate(self.files, start=1):
            if ctx.cancelled:
                # Returning while cancelled ends the job as cancelled; the result is dropped.
                break
            n = count_words(file, ctx.params.encoding)
            words += n
            files += 1
            ctx.emit("file", WordcountFile(path=str(file), words=n))
            name = str(file.relative_to(self.root)) if file != self.root else file.name
            ctx.progress(i, total_files, message=name, words=words)
        return {"words": words, "files": files}


def count_words(path: Path, encoding: str = "utf-8") -> int:
    """The number of whitespace-separated words in a text file, read a line at a time."""
    with path.open(encoding=encoding) as f:
        return sum(len(line.split()) for line in f)


__all__ = ["WordcountRunner", "count_words"]
