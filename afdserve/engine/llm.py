"""`LLM`: offline batch generation on the same engine path the server uses."""
from __future__ import annotations

import itertools
from typing import Sequence

from afdserve.engine.engine import EngineArgs, LLMEngine, RequestOutput
from afdserve.sampling import SamplingParams


class LLM:
    """`LLM(model=DIR, dtype="auto"|"float32"|"bfloat16", afd=None|"2A1F", ...)`; a context manager.

    Extra keyword arguments are `EngineArgs` fields (block_size, num_kv_blocks, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", afd: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineArgs(model=model, dtype=dtype, afd=afd, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order.

        `prompts`: a string, a list of strings, or a list of token-id lists.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
            results = self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        errors = [r.error for r in results.values() if r.error]
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")
        return [results[rid] for rid in ids]

    def _run(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        results: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from rich.progress import Progress
            progress = Progress(transient=True)
            task = progress.add_task("generating", total=len(ids))
            progress.start()
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if progress:
                            progress.update(task, advance=1)
        finally:
            if progress:
                progress.stop()
        return results

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
