"""Checkpoints as Hugging Face directories: config.json, model.safetensors, tokenizer.json, and
llmos.json (provenance). ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads them;
:func:`load_checkpoint` loads ours and Llama-family ones saved by transformers."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmos.plugins.lm.config import LlamaConfig
from llmos.plugins.lm.model import Llama

# What a checkpoint holds beside tokenizer.json for tokenizers and chat: copied from the model a
# checkpoint derives from, else written with llmos's defaults.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# The chat template of the models llmos trains (docs/api.md): each message as ``<|role|>``, a
# newline, its content and the end-of-text token; with ``add_generation_prompt``, the assistant's
# header after them. Rendered as transformers renders templates (jinja2's sandbox, trim_blocks and
# lstrip_blocks).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|assistant|>\\n' }}\n"
    "{%- endif %}\n"
)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: what is missing or wrong, and where."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import llmos

    out = {"llmos": llmos.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("safetensors", "tokenizers", "transformers"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            pass
    return out


def save_checkpoint(directory: Path, model: Llama, tokenizer_json: str | None, manifest: dict[str, Any], extra_state: dict[str, torch.Tensor] | None = None,
                    config_extra: dict[str, Any] | None = None, tokenizer_from: str | Path | None = None) -> Path:
    """Write the checkpoint atomically (a temporary directory renamed into place).

    The tensors are the model's ``state_dict`` (layers that store themselves differently, such as
    quantized ones, name their own tensors); ``config_extra`` adds keys to ``config.json`` (a
    ``quantization_config``). Beside ``tokenizer_json`` go the tokenizer's config and chat
    template: those of the checkpoint ``tokenizer_from`` (the model this one derives from) where
    it has them, else llmos's defaults (:data:`DEFAULT_CHAT_TEMPLATE`)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens, as transformers saves it
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config.to_hf_dict(), **(config_extra or {})}, indent=2))
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        _tokenizer_files(tmp, tokenizer_json, config, Path(tokenizer_from) if tokenizer_from else None)
    _generation_config(tmp, config, Path(tokenizer_from) if tokenizer_from else None)
    if extra_state:
        save_file({k: v.contiguous().cpu() for k, v in extra_state.items()}, str(tmp / "train_state.safetensors"))
    full = {
        "format": "llmos-checkpoint/1",
        "created_at": time.time(),
        "model_sha256": file_sha256(tmp / "model.safetensors"),
        "parameters": sum(v.numel() for v in state.values()),
        "libraries": library_versions(),
        **manifest,
    }
    (tmp / "llmos.json").write_text(json.dumps(full, indent=2, default=str))
    # safetensors writes its files 0600; give them the mode the other files got (the umask's).
    mode = (tmp / "config.json").stat().st_mode & 0o777
    for weights in tmp.glob("*.safetensors"):
        os.chmod(weights, mode)
    if directory.exists():
        old = directory.with_name(directory.name + f".old{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        _rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def _tokenizer_files(out: Path, tokenizer_json: str, config: Any, source: Path | None) -> None:
    """tokenizer_config.json and chat_template.jinja for a checkpoint: copied from ``source``
    when it has any of them (a pruned or quantized model keeps its parent's), else the defaults:
    transformers' ``AutoTokenizer`` then loads the tokenizer with its end-of-text token, and chat
    requests have a template."""
    import shutil

    found = [name for name in TOKENIZER_FILES if source is not None and (source / name).is_file()]
    if found:
        for name in found:
            shutil.copyfile(source / name, out / name)  # type: ignore[operator]
        return
    from tokenizers import Tokenizer

    from llmos.plugins.lm.text import EOS

    has_eos = Tokenizer.from_str(tokenizer_json).token_to_id(EOS) is not None
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        **({"eos_token": EOS} if has_eos else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)


#: How llmos's checkpoints sample by default (their generation_config.json, as transformers reads
#: it): mild temperature and nucleus sampling. Plain temperature 1.0 over the whole vocabulary
#: makes a small model's first sample noise.
GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0}


def _generation_config(out: Path, config: Any, source: Path | None) -> None:
    """generation_config.json: the source checkpoint's (a derived model samples as its parent
    did), else llmos's defaults with the model's special tokens."""
    import shutil

    if source is not None and (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
        return
    data = {**GENERATION_DEFAULTS, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=2))


def read_generation_config(directory: str | Path) -> dict[str, Any]:
    """The sampling options a checkpoint's generation_config.json asks for, in llmos's names
    (``temperature`` 0 where it says ``do_sample: false``); {} if it has none or it cannot be read."""
    try:
        data = json.loads((Path(directory) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("repetition_penalty", float), ("max_new_tokens", int)):
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = kind(value)
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def read_chat_template(directory: str | Path) -> str | None:
    """A checkpoint's chat template: ``chat_template`` in tokenizer_config.json (a string, or a
    list of named templates: the one named "default"), else chat_template.jinja; None if neither."""
    directory = Path(directory)
    try:
        template = json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        return template
    path = directory / "chat_template.jinja"
    return path.read_text() if path.is_file() else None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def read_config(directory: Path) -> LlamaConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no config.json")
    try:
        return LlamaConfig.from_hf_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[Llama, dict[str, Any]]:
    """The model of a checkpoint directory and its llmos.json (empty for foreign checkpoints).

    Missing, unexpected or mis-shaped tensors are a :class:`CheckpointError` naming them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist or is not a directory")
    config = read_config(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        shards = sorted(directory.glob("model-*.safetensors"))
        if not shards:
            raise CheckpointError(f"{directory} has no model.safetensors")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
    else:
        try:
            state = load_file(str(weights))
        except Exception as exc:
            raise CheckpointError(f"{weights} cannot be read: {exc}") from None
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (first: {k} is {tuple(state[k].shape)}, config.json implies {tuple(expected[k])})")
        raise CheckpointError(f"{weights}: " + "; ".join(parts))
    model = Llama(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    model.to(device=device, dtype=dtype)
    manifest_path = directory / "llmos.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return model, manifest
