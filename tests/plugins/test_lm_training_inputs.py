"""What a train job reads and starts from, through a real kernel: learned and given tokenizers,
fine-tuning, gradient accumulation, a config map, JSON lines, glob filters, stdlib, compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle, write_word_corpus

torch = pytest.importorskip("torch")

from llmos.plugins.lm.checkpoint import file_sha256, load_checkpoint, read_config  # noqa: E402
from llmos.plugins.lm.config import LlamaConfig  # noqa: E402
from llmos.plugins.lm.model import Llama  # noqa: E402
from llmos.plugins.lm.text import (  # noqa: E402
    bytes_tokenizer,
    corpus_files,
    documents,
    load_tokenizer,
    tokenize_corpus,
    train_bpe,
)
from llmos.plugins.lm.train import batch_at  # noqa: E402

SMALL = dict(preset="nano", tokenizer="bytes", seq_len=32, batch_size=8, lr=3e-3, warmup_steps=5, eval_batches=2, eval_every=0, log_every=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), 40)


def _train(c: llmos.Client, data: Path | str, **params) -> llmos.Job:
    return c.submit("train", params={**SMALL, "data": str(data), **params})


def _losses(job: llmos.Job, name: str = "train_loss") -> dict[int, float]:
    return {e.body["step"]: e.body["value"] for e in job.events(follow=False) if e.type == "job.metric" and e.body["name"] == name}


def _log(job: llmos.Job, event: str) -> dict:
    """The fields of the job's one log record named ``event``."""
    found = [e.body["fields"] for e in job.logs(follow=False) if e.body["event"] == event]
    assert len(found) == 1, found
    return found[0]


def _messages(job: llmos.Job) -> list[str]:
    return [e.body["message"] for e in job.events(follow=False) if e.type == "job.progress" and e.body["message"]]


def _manifest(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "llmos.json").read_text())


def _token_count(texts: list[str], tok) -> int:
    """Tokens of a corpus of these documents, each followed by the end-of-text token."""
    return sum(len(ids) + 1 for ids in tok.encode_batch(texts))


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_learned_bpe_tokenizer_is_saved_and_reused(kernel: KernelHandle, client: llmos.Client, tmp_path: Path) -> None:
    root = write_word_corpus(tmp_path, 40)
    params = dict(tokenizer="bpe", vocab_size=280, steps=2)
    cache = kernel.state_dir / "cache" / "tokenizers"  # learned vocabularies, by corpus and size
    before = set(cache.glob("*.json"))
    first = _train(client, root, **params, output=str(tmp_path / "first"))
    ck = Path(first.result(timeout=120)["checkpoint"])
    assert "learning a 280-token BPE vocabulary from the corpus" in _messages(first)
    tok = load_tokenizer(ck)
    assert tok.vocab_size == 280 and tok.eos_id is not None
    assert read_config(ck).vocab_size == 280 and read_config(ck).eos_token_id == tok.eos_id
    assert len(tok.encode(" alpha beta gamma")) < len(" alpha beta gamma")  # fewer tokens than bytes
    assert _log(first, "corpus_ready")["cached"] is False
    cached = set(cache.glob("*.json")) - before
    assert len(cached) == 1 and load_tokenizer(*cached).to_json() == tok.to_json()
    (path,) = cached
    mtime = path.stat().st_mtime_ns

    # The same corpus again: the vocabulary comes from the cache, and so do the tokens.
    second = _train(client, root, **params, output=str(tmp_path / "second"))
    ck2 = Path(second.result(timeout=120)["checkpoint"])
    assert not [m for m in _messages(second) if "BPE" in m]
    assert set(cache.glob("*.json")) - before == cached and path.stat().st_mtime_ns == mtime  # not written again
    assert (ck2 / "tokenizer.json").read_text() == (ck / "tokenizer.json").read_text()
    assert _log(second, "corpus_ready")["cached"] is True
    assert _manifest(ck2)["data"]["tokenizer_sha256"] == _manifest(ck)["data"]["tokenizer_sha256"] == tok.sha256()


def test_a_tokenizer_json_path(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    docs = list(documents(corpus_files(str(corpus), "**/*.txt"), "text", 10_000_000))
    tok = train_bpe(iter(docs), 270)
    path = tmp_path / "my-tokenizer.json"
    path.write_text(tok.to_json())
    job = _train(client, corpus, tokenizer=str(path), steps=2)
    ck = Path(job.result(timeout=120)["checkpoint"])
    assert not [m for m in _messages(job) if "BPE" in m]  # nothing learned
    assert (ck / "tokenizer.json").read_text() == tok.to_json()
    assert read_config(ck).vocab_size == 270
    ready = _log(job, "corpus_ready")
    assert ready["train_tokens"] + ready["val_tokens"] == _token_count(docs, tok)
    assert _manifest(ck)["data"]["tokenizer_sha256"] == tok.sha256()


# ---------------------------------------------------------------------------------------------
# where the weights come from


def test_fine_tune_from_a_checkpoint(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    scratch = _train(client, corpus, steps=40, output=str(tmp_path / "base"))
    base = Path(scratch.result(timeout=120)["checkpoint"])
    fine = _train(client, corpus, steps=3, log_every=1, init_from=str(base), output=str(tmp_path / "fine"))
    result = fine.result(timeout=120)
    manifest = _manifest(result["checkpoint"])
    assert manifest["parent"] == {"path": str(base), "sha256": file_sha256(base / "model.safetensors")}
    assert manifest["parent"]["sha256"] == _manifest(base)["model_sha256"]
    assert manifest["recipe"]["init_from"] == str(base) and manifest["train_state"]["step"] == 3
    assert result["resumed_from_step"] is None  # a fine-tune starts at step 1, not where the parent stopped
    assert sorted(_losses(fine)) == [1, 2, 3]
    assert _manifest(base)["parent"] is None
    from_scratch, tuned = _losses(scratch)[1], _losses(fine)[1]
    assert tuned < 0.6 * from_scratch, (tuned, from_scratch)


def test_a_config_map_instead_of_a_preset(client: llmos.Client, corpus: Path) -> None:
    shape = {
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rope_theta": 5000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    }
    job = _train(client, corpus, preset="micro", config=shape, steps=2)  # the config wins over the preset
    result = job.result(timeout=120)
    config = json.loads((Path(result["checkpoint"]) / "config.json").read_text())
    assert {k: config[k] for k in shape} == shape
    assert config["vocab_size"] == 257 and config["model_type"] == "llama" and config["head_dim"] == 8
    assert result["parameters"] == LlamaConfig(vocab_size=257, **shape).num_parameters()
    model, _ = load_checkpoint(result["checkpoint"])
    assert len(model.model.layers) == 3 and model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------
# gradient accumulation


def test_grad_accum_steps_over_its_micro_batches_together(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    """batch_size is one micro-batch; a step of grad_accum=2 draws micro-batches 2s and 2s+1 and
    takes one optimizer step on their mean loss: the same as a plain loop over both at once."""
    params = dict(steps=3, batch_size=4, grad_accum=2, warmup_steps=0, min_lr_ratio=1.0, log_every=1, seed=3)
    job = _train(client, corpus, **params, output=str(tmp_path / "acc"))
    result = job.result(timeout=120)
    got = _losses(job)
    assert sorted(got) == [1, 2, 3]
    assert result["tokens"] == 3 * 2 * 4 * 32 == _manifest(result["checkpoint"])["metrics"]["tokens"]
    assert [e.body["step"] for e in job.events(follow=False) if e.type == "job.progress" and "tokens_per_s" in e.body["fields"]] == [1, 2, 3]

    # The same run, written out: one step over the 8 sequences of micro-batches 2s and 2s+1.
    train, _, _ = tokenize_corpus(corpus_files(str(corpus), "**/*.txt"), bytes_tokenizer(), tmp_path / "cache", max_bytes=10_000_000, val_fraction=0.05)
    model = Llama(read_config(result["checkpoint"]))
    model.init_weights(3)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    expected = {}
    for step in (1, 2, 3):
        (x0, y0), (x1, y1) = batch_at(train, 2 * step, 3, 4, 32), batch_at(train, 2 * step + 1, 3, 4, 32)
        loss = model.loss(torch.cat([x0, x1]), torch.cat([y0, y1]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        expected[step] = loss.item()
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-5, (got, expected)


# ---------------------------------------------------------------------------------------------
# corpora


def test_json_lines_corpus_reads_its_text_field(client: llmos.Client, tmp_path: Path) -> None:
    words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]
    texts = [" ".join(words[(i + k) % len(words)] for k in range(120)) for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t, "note": "not this"}) + "\n" + ("\n" if i % 7 == 0 else "") for i, t in enumerate(texts)))
    job = _train(client, path, text_field="body", steps=2)
    ck = job.result(timeout=120)["checkpoint"]
    ready = _log(job, "corpus_ready")
    assert ready["files"] == 1
    assert ready["train_tokens"] + ready["val_tokens"] == _token_count(texts, bytes_tokenizer())  # the bodies, nothing else
    assert _manifest(ck)["data"]["text_field"] == "body"
    info = _train(client, path, steps=2).wait(timeout=120)  # the default field, "text", is not there
    assert info.state == "failed" and f"{path}:1: expected a JSON object with a string field 'text'" in info.reason, info.reason


def test_directory_glob_reads_only_matching_files(client: llmos.Client, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_word_corpus(root, 24)
    (root / "sub").mkdir()
    (root / "sub" / "doc10.txt").write_text("a file in a subdirectory, outside the glob " * 50)
    (root / "doc1-notes.md").write_text("markdown, outside the glob " * 50)
    job = _train(client, root, glob="doc1?.txt", steps=2)
    ck = job.result(timeout=120)["checkpoint"]
    ready = _log(job, "corpus_ready")
    read = [root / f"doc{i}.txt" for i in range(10, 20)]
    assert ready["files"] == 10
    assert ready["train_tokens"] + ready["val_tokens"] == _token_count([p.read_text() for p in read], bytes_tokenizer())
    assert _manifest(ck)["data"]["glob"] == "doc1?.txt" and _manifest(ck)["data"]["files"] == 10


def test_stdlib_corpus_on_cpu(client: llmos.Client) -> None:
    job = _train(client, "stdlib", max_bytes=200_000, steps=2)
    result = job.result(timeout=120)
    assert _log(job, "model_ready")["device"] == "cpu"
    ready = _log(job, "corpus_ready")
    files = corpus_files("stdlib", "**/*.txt")  # every .py file of the standard library; the glob is for directories
    assert ready["files"] == len(files) > 100
    read = list(documents(files, "text", 200_000))
    assert sum(len(t) for t in read) == 200_000 and len(read) < len(files)  # it stopped at max_bytes
    assert ready["train_tokens"] + ready["val_tokens"] == _token_count(read, bytes_tokenizer())
    data = _manifest(result["checkpoint"])["data"]
    assert data["source"] == "stdlib" and data["max_bytes"] == 200_000
    assert result["val_loss"] > 0


def test_max_bytes_caps_a_one_file_corpus(client: llmos.Client, tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("\n".join(p.read_text() for p in sorted(write_word_corpus(tmp_path, 30).glob("doc*.txt"))))
    assert len(path.read_text()) > 40_000
    job = _train(client, path, max_bytes=10_000, steps=1)
    job.result(timeout=120)
    ready = _log(job, "corpus_ready")
    assert ready["train_tokens"] + ready["val_tokens"] == 10_000 + 1  # max_bytes bytes (ASCII), and one end-of-text


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_model_trains_like_the_eager_one(client: llmos.Client, corpus: Path, tmp_path: Path) -> None:
    """About 40 s on a 2-core CPU with a cold inductor cache, 15 s with a warm one (most of it compiling)."""
    eager = _train(client, corpus, steps=3, log_every=1, output=str(tmp_path / "eager"))
    compiled = _train(client, corpus, steps=3, log_every=1, compile=True, output=str(tmp_path / "compiled"))
    result = compiled.result(timeout=300)
    eager.result(timeout=120)
    a, b = _losses(eager), _losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert _manifest(result["checkpoint"])["recipe"]["compile"] is True
