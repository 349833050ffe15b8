"""The ``generate`` job: complete prompts with the inference engine, in batches, optionally
streaming (imported only in workers: it imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llmos
from llmos.plugins.lm.checkpoint import read_generation_config
from llmos.plugins.lm.runtime import load_for_job, pick_device, set_threads, tokenizer_beside


class GenerateRunner(llmos.Runner):
    """Complete prompts (a parameter or a JSON-lines file) in batches; completions go to a
    JSON-lines artifact. With ``stream``, every text piece is also a ``job.<id>.token`` event."""

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        import json

        from llmos.plugins.lm.engine import Engine, Sampling
        from llmos.protocol import GeneratedText

        p = ctx.params
        set_threads(ctx, p.threads)
        device = pick_device(ctx)
        model, _ = load_for_job(ctx, p.model, device)
        engine = Engine(model, tokenizer_beside(p.model), dtype=p.dtype, device=device)
        prompts = list(p.prompts or [])
        if p.prompts_file:
            with open(p.prompts_file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            prompt = json.loads(line)[p.prompt_field]
                            if not isinstance(prompt, str):
                                raise TypeError(prompt)
                            prompts.append(prompt)
                        except (ValueError, KeyError, TypeError):
                            raise ValueError(f"{p.prompts_file}:{n}: expected a JSON object with a string field {p.prompt_field!r}") from None
        if not prompts:
            raise ValueError("no prompts: give prompts=[...] or prompts_file=PATH")
        # What was not asked for comes from the model's generation_config.json, then the engine's defaults.
        model_says = read_generation_config(p.model)
        asked = {k: getattr(p, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty") if getattr(p, k) is not None}
        chosen = {**{k: v for k, v in model_says.items() if k in ("temperature", "top_k", "top_p", "repetition_penalty")}, **asked}
        sampling = Sampling(max_new_tokens=p.max_new_tokens, seed=p.seed, stop=tuple(p.stop), stop_tokens=tuple(p.stop_tokens), **chosen).validate()
        ctx.log.info("sampling", temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                     from_model=sorted(set(chosen) - set(asked)))
        for i, prompt in enumerate(prompts):
            engine.encode(prompt)  # every prompt must fit before any work is done
            del i
        out_path = Path(p.output) if p.output else ctx.workdir / "completions.jsonl"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        results = []
        base = 0

        def on_token(index: int, token: int, piece: str) -> None:
            if p.stream:
                ctx.emit("token", GeneratedText(index=base + index, token=token, text=piece))

        with open(out_path, "w", encoding="utf-8") as out:
            for start in range(0, len(prompts), p.batch_size):
                if ctx.cancelled:
                    break
                batch = prompts[start : start + p.batch_size]
                base = start
                for prompt, completion in zip(batch, engine.generate(batch, sampling, on_token=on_token)):
                    record = {"prompt": prompt, **completion.to_dict()}
                    out.write(json.dumps(record) + "\n")
                    results.append(record)
                ctx.progress(min(start + p.batch_size, len(prompts)), len(prompts), message="prompts completed")
        ctx.artifact(out_path, kind="completions", count=len(results))
        used = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "repetition_penalty": sampling.repetition_penalty}
        return {"output": str(out_path), "count": len(results), "sampling": used, "completions": results[:16]}


__all__ = ["GenerateRunner"]
