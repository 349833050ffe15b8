"""Tokenizers (byte-level BPE trained on the corpus, an existing tokenizer.json, or plain bytes)
and corpora (files, directories, JSON lines, or the Python standard library's own source),
tokenized once into memory-mapped arrays."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


class Tok:
    """A Hugging Face ``tokenizers.Tokenizer`` with the few things training needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tk = tokenizer
        self.eos_id = tokenizer.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids)

    def to_json(self) -> str:
        return self.tk.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _byte_level() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tok:
    """Byte-level BPE learned from ``texts`` (every byte is in the alphabet: nothing is unknown)."""
    tk = _byte_level()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tok(tk)


def bytes_tokenizer() -> Tok:
    """One token per byte, plus the end-of-text token."""
    return train_bpe(iter([""]), 257)


def load_tokenizer(path: str | Path) -> Tok:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        return Tok(Tokenizer.from_file(str(path)))
    except Exception as exc:
        raise ValueError(f"tokenizer {path} cannot be read: {exc}") from None


# ---------------------------------------------------------------------------------------------
# corpora


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(data: str, glob: str) -> list[Path]:
    """The files of a corpus, in a fixed order; ``stdlib`` is the standard library's .py files."""
    if data == "stdlib":
        root = stdlib_root()
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data path {root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.glob(glob) if p.is_file())
    if not files:
        raise ValueError(f"corpus {data!r} has no files matching {glob!r}")
    return files


def documents(files: list[Path], text_field: str, max_bytes: int) -> Iterator[str]:
    """The corpus's documents: a text file is one, a .jsonl file has one per line (``text_field``);
    at most ``max_bytes`` characters in all (the last one read is cut short)."""
    total = 0
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n}: expected a JSON object with a string field {text_field!r}") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: field {text_field!r} is not a string")
                    text = text[: max_bytes - total]  # the last document is cut at the budget
                    total += len(text)
                    yield text
                    if total >= max_bytes:
                        return
        else:
            text = path.read_text(encoding="utf-8", errors="replace")[: max_bytes - total]
            total += len(text)
            yield text
            if total >= max_bytes:
                return


def files_signature(files: list[Path]) -> str:
    """A hash of the files' paths, sizes and modification times (their content, for a cache)."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def corpus_key(files: list[Path], tok: Tok, text_field: str, max_bytes: int, val_fraction: float) -> str:
    h = hashlib.sha256(files_signature(files).encode())
    # "v2": documents are cut at max_bytes (v1 read the last one whole): older caches are not reused.
    h.update(f"v2|{tok.sha256()}|{text_field}|{max_bytes}|{val_fraction}".encode())
    return h.hexdigest()[:24]


def tokenize_corpus(files: list[Path], tok: Tok, cache_dir: Path, *, text_field: str = "text", max_bytes: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Train and validation token arrays (memory-mapped, cached by content); True if from the cache.

    Split: with 20 documents or more, a document goes to validation when its hash says so
    (deterministic); with fewer, the last ``val_fraction`` of the token stream is validation.
    """
    key = corpus_key(files, tok, text_field, max_bytes, val_fraction)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    train_path, val_path = cache_dir / f"{key}.train.bin", cache_dir / f"{key}.val.bin"
    if train_path.exists() and val_path.exists():
        return np.memmap(train_path, dtype=dtype, mode="r"), np.memmap(val_path, dtype=dtype, mode="r"), True
    docs = list(documents(files, text_field, max_bytes))
    if not any(d.strip() for d in docs):
        raise ValueError("the corpus is empty: no text in its files")
    encoded = tok.encode_batch(docs)
    eos = [tok.eos_id] if tok.eos_id is not None else []
    train: list[int] = []
    val: list[int] = []
    if len(docs) >= 20:
        for doc, ids in zip(docs, encoded):
            bucket = int(hashlib.sha256(doc.encode(errors="replace")).hexdigest()[:8], 16) % 10_000
            (val if bucket < val_fraction * 10_000 else train).extend(ids + eos)
    if not val or not train:
        stream = [t for ids in encoded for t in ids + eos]
        cut = max(1, int(len(stream) * (1 - val_fraction)))
        train, val = stream[:cut], stream[cut:]
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path, ids in ((train_path, train), (val_path, val)):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        np.asarray(ids, dtype=dtype).tofile(tmp)
        tmp.replace(path)
    return np.memmap(train_path, dtype=dtype, mode="r"), np.memmap(val_path, dtype=dtype, mode="r"), False
