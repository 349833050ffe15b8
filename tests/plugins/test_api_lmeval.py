"""lm-evaluation-harness through the gateway: ``local-completions`` (prompt scoring with ``echo``
and ``logprobs``, the server's own tokenizer through /tokenizer_info and /tokenize) gives the
loglikelihoods and the accuracy of lm-eval's ``hf`` backend on the same checkpoint. The task is
defined in this test's own files; nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import KernelHandle

torch = pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from llmos.plugins.lm.checkpoint import save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("The color of the sky is", ["blue", "green", "loud", "seven"], 0),
    ("Two plus two equals", ["four", "five", "purple"], 0),
    ("A cat says", ["meow", "moo", "quack"], 0),
    ("def add(a, b): return a", ["+ b", "- b", "* b"], 0),
    ("The opposite of hot is", ["cold", "warm", "spicy"], 0),
    ("import numpy as", ["np", "pd", "torch"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "minutes"], 0),
    ("The first letter of the alphabet is", ["A", "Z", "M"], 0),
]


def _task(root: Path) -> Path:
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "llmos_mc.yaml").write_text(
        "task: llmos_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


def _evaluate(model: str, model_args: str, tasks: Path, batch_size: int) -> tuple[float, list[list[float]]]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["llmos_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True, batch_size=batch_size, device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    samples = sorted(out["samples"]["llmos_mc"], key=lambda s: s["doc_id"])
    loglikelihoods = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return float(out["results"]["llmos_mc"]["acc,none"]), loglikelihoods


def test_local_completions_equals_the_hf_backend(tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size, max_position_embeddings=256))
    model.init_weights(seed=5, std=0.4)
    checkpoint = save_checkpoint(tmp_path / "mc-model", model, tok.to_json(), {})
    tasks = _task(tmp_path)

    hf_acc, hf_ll = _evaluate("hf", f"pretrained={checkpoint},dtype=float32", tasks, batch_size=4)
    handle = KernelHandle(short_tmp / "state").boot()
    try:
        handle.cli("serve", str(checkpoint), "--name", "mc", "--max-len", "256")
        url = json.loads(handle.cli("api", "--port", "0", "--json").stdout)["url"]
        args = f"model=mc,base_url={url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=256"
        api_acc, api_ll = _evaluate("local-completions", args, tasks, batch_size=4)  # four prompts of token ids per request
    finally:
        handle.shutdown()
    assert len(api_ll) == len(QUESTIONS) and [len(x) for x in api_ll] == [len(c) for _, c, _ in QUESTIONS]
    worst = max(abs(a - b) for doc_a, doc_b in zip(api_ll, hf_ll) for a, b in zip(doc_a, doc_b))
    assert worst < 1e-4, f"loglikelihoods differ by up to {worst}"
    assert api_acc == hf_acc
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
