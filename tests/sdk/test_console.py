"""The progress printer: in place on a terminal, plain lines when piped."""

from __future__ import annotations

import io

from llmos.console import ProgressPrinter, progress_text

BODY = {"step": 40, "total": 100, "message": "training", "fields": {"loss": 3.21, "tokens_per_s": 1234.0, "eta_s": 12.0}}


def test_progress_text() -> None:
    text = progress_text(BODY)
    assert text.startswith("[") and "step 40/100" in text and "loss 3.2100" in text and "1,234 tok/s" in text and "ETA 12s" in text
    assert progress_text({"step": 3}) == "step 3"


def test_terminal_overwrites_and_pipe_appends() -> None:
    out = io.StringIO()
    p = ProgressPrinter(out, tty=True)
    p.progress(BODY)
    p.progress(dict(BODY, step=41))
    p.line("state succeeded")
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\nstate succeeded\n") and "step 41/100" in text
    out = io.StringIO()
    p = ProgressPrinter(out, tty=False)
    p.progress(BODY)
    p.line("done")
    p.close()
    assert out.getvalue().splitlines()[1] == "done" and "\r" not in out.getvalue()
