"""Models of another format, loaded by a third-party plugin's ``llmos_load_model`` hook, run in the
lm plugin's eval and generate jobs and its serve service."""

from __future__ import annotations

import json
import math
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.conftest import KernelHandle, write_word_corpus

torch = pytest.importorskip("torch")

from llmos.plugins.lm.checkpoint import save_checkpoint  # noqa: E402
from llmos.plugins.lm.config import config_from_preset  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import bytes_tokenizer  # noqa: E402

# A "recipe" file: a model config and a seed; the plugin builds the weights from them.
PLUGIN = textwrap.dedent(
    '''
    import json
    from pathlib import Path

    import llmos


    @llmos.hookimpl
    def llmos_load_model(path, device, dtype):
        if not str(path).endswith(".recipe"):
            return None
        from llmos.plugins.lm.config import config_from_dict
        from llmos.plugins.lm.model import Llama

        spec = json.loads(Path(path).read_text())
        model = Llama(config_from_dict(spec["config"]))
        model.init_weights(spec["seed"])
        return model.to(device or "cpu")
    '''
)


def test_a_plugins_model_format_runs_in_eval_generate_and_serve(tmp_path: Path) -> None:
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "recipe_plugin.py").write_text(PLUGIN)
    models = tmp_path / "models"
    models.mkdir()
    config = config_from_preset("nano", 257)
    (models / "nano.recipe").write_text(json.dumps({"config": asdict(config), "seed": 3}))
    (models / "tokenizer.json").write_text(bytes_tokenizer().to_json())
    (models / "x.unknown").write_text("no plugin reads this")
    reference = Llama(config)
    reference.init_weights(3)
    save_checkpoint(tmp_path / "reference", reference, bytes_tokenizer().to_json(), {})
    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", 4)
    env = {"PYTHONPATH": str(tmp_path / "plug"), "LLMOS_PLUGIN_MODULES": "recipe=recipe_plugin"}
    handle = KernelHandle(tmp_path / "state", env=env).boot()
    try:
        with handle.client() as c:
            greedy = {"prompts": ["alpha beta", "gam"], "max_new_tokens": 8, "temperature": 0}
            got = c.submit("generate", params={"model": str(models / "nano.recipe"), **greedy}).result(timeout=120)
            want = c.submit("generate", params={"model": str(tmp_path / "reference"), **greedy}).result(timeout=120)
            assert [x["tokens"] for x in got["completions"]] == [x["tokens"] for x in want["completions"]]
            scored = c.submit("eval", params={"model": str(models / "nano.recipe"), "data": str(corpus), "batches": 1, "seq_len": 32, "max_new_tokens": 2}).result(timeout=120)
            assert math.isfinite(scored["loss"]) and scored["tokens"] > 0
            served = c.submit("serve", params={"model": str(models / "nano.recipe"), "name": "recipe"})
            deadline = time.monotonic() + 60
            while not any(s["name"] == "recipe" and s["replicas"] for s in c.services()):
                assert time.monotonic() < deadline and not served.info().ended, served.info()
                time.sleep(0.1)
            assert c.generate("recipe", "alpha beta", max_new_tokens=8, temperature=0).tokens == want["completions"][0]["tokens"]
            served.cancel()
            info = c.submit("generate", params={"model": str(models / "x.unknown"), "prompts": ["a"]}).wait(timeout=120)
            assert info.state == "failed" and f"no plugin can load a model from {models / 'x.unknown'}" in info.reason
    finally:
        handle.shutdown()
