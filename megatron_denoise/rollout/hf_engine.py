"""`RolloutEngine` on transformers' `generate`: the parity oracle for the vLLM engine and a
dependency-light engine for tiny tests and demos.

Rows run one at a time by default (batch_size=1): no padding, so greedy output is exactly what
the model computes for those ids. With batch_size > 1, rows with the same max_tokens are
left-padded into batches (faster; used by the benchmark). Sampling seeds: with batch_size=1 each
row is seeded by its own `request.seed` (reproducible per row); in batches the first row's seed
seeds the batch.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Sequence

from megatron_denoise.core.types import Completion, RolloutRequest
from megatron_denoise.rollout.engine import SamplingSpec, check_requests

__all__ = ["HFEngine"]


class HFEngine:
    def __init__(self, model_path: str, *, dtype: str = "float32", batch_size: int = 1,
                 device: str | None = None) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        gen = GenerationConfig.from_pretrained(model_path) if os.path.exists(
            os.path.join(model_path, "generation_config.json")) else self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if not self.eos_ids:
            raise ValueError(f"{model_path}: no eos_token_id in generation_config.json or config.json")
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.batch_size = max(1, int(batch_size))
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        self._asleep = False

    # -- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("HFEngine.generate called while the engine is asleep; call wake_up() first")
        requests = list(requests)
        check_requests(requests, self.max_model_len)
        out: list[Completion | None] = [None] * len(requests)
        if self.batch_size == 1:
            for i, r in enumerate(requests):
                out[i] = self._run([r], sampling)[0]
            return out  # type: ignore[return-value]
        by_budget: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_budget.setdefault(r.max_tokens, []).append(i)
        for idx in by_budget.values():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                for i, c in zip(chunk, self._run([requests[i] for i in chunk], sampling)):
                    out[i] = c
        return out  # type: ignore[return-value]

    def _run(self, rows: list[RolloutRequest], s: SamplingSpec) -> list[Completion]:
        torch = self.torch
        width = max(len(r.engine_input_ids) for r in rows)
        # Left padding: every row's last input token sits at the same position.
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            x = r.engine_input_ids
            ids[b, width - len(x):] = torch.tensor(x)
            mask[b, width - len(x):] = 1
        # ignore_eos: no EOS stops a row (transformers stops only on the eos ids it is given).
        kw = dict(max_new_tokens=rows[0].max_tokens, eos_token_id=None if s.ignore_eos else sorted(self.eos_ids),
                  pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=s.logprobs)
        if s.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p,
                      top_k=s.top_k if s.top_k > 0 else None)
            torch.manual_seed(rows[0].seed)
        with torch.inference_mode():
            res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        new = res.sequences[:, width:].cpu()  # [rows, generated]
        logp = None
        if s.logprobs:  # raw logits per step -> log-softmax of the sampled token: [rows, generated]
            steps = torch.stack([l.float() for l in res.logits], dim=1).cpu()
            logp = torch.log_softmax(steps, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        comps = []
        for b in range(len(rows)):
            toks = new[b].tolist()
            reason = "length"
            for j, t in enumerate(toks):
                if t in self.eos_ids and not s.ignore_eos:
                    toks, reason = toks[:j + 1], "stop"
                    break
            toks = toks[:rows[b].max_tokens]
            lps = tuple(float(v) for v in logp[b, :len(toks)]) if logp is not None else None
            comps.append(Completion(token_ids=tuple(toks), finish_reason=reason, logprobs=lps))
        return comps

    def teacher_forced(self, input_ids: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], list[float]]:
        """One forward pass over input + continuation: for each continuation position, the model's
        argmax token and the log-prob of the given token (raw logits), given everything before it.

        A continuation is this model's greedy output iff argmax == continuation at every position:
        the check costs one forward pass instead of one per generated token.
        """
        torch = self.torch
        ids = torch.tensor([list(input_ids) + list(continuation)], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()  # [len, vocab]
        n = len(input_ids)
        pred = logits[n - 1:-1]  # [len(continuation), vocab]: position t predicts token t+1
        target = ids[0, n:]
        logp = torch.log_softmax(pred, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return pred.argmax(-1).tolist(), logp.tolist()

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, object]]) -> float:
        """Copy the full HF state dict into the model (strict: every parameter, no unknown name)."""
        t0 = time.perf_counter()
        sd = {n: t for n, t in named_tensors}
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        own = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            own.pop("lm_head.weight", None)
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            raise KeyError(f"HFEngine.update_weights: missing tensors {missing[:8]}, unknown tensors {extra[:8]}")
        with self.torch.no_grad():
            for n, t in sd.items():
                if tuple(t.shape) != tuple(own[n].shape):
                    raise ValueError(f"HFEngine.update_weights: {n} has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(own[n].shape)}")
                own[n].copy_(t)
        return time.perf_counter() - t0

    def sleep(self) -> None:
        self._asleep = True

    def wake_up(self) -> None:
        self._asleep = False

    def close(self) -> None:
        self.model = None
