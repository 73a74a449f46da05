"""Shared builders for the core tests: a deterministic character tokenizer and row factories."""
from __future__ import annotations

from typing import Sequence

from megatron_denoise.config.schema import DenoiseConfig, RhoConfig
from megatron_denoise.core.types import Completion, PrefixSpan, Problem, Rollout, RolloutRequest, RowKind

EOS = 2


def char_encode(text: str) -> list[int]:
    """One token per character (id = code point): |w| = len(w), so prefix lengths are hand-checkable."""
    return [ord(c) for c in text]


def char_decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids if i != EOS)


class BosAddingTokenizer:
    """Mimics a Hugging Face tokenizer whose encode() prepends BOS unless told not to."""

    BOS = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.BOS] if add_special_tokens else []) + char_encode(text)


def problem(uid: str, pool: Sequence[object] = (), index: int = 0) -> Problem:
    return Problem(uid=uid, index=index, prompt=({"role": "user", "content": f"q {uid}"},),
                   ground_truth="1", wrong_pool=tuple(pool))  # type: ignore[arg-type]


def denoise_cfg(n: int = 2, k: int = 2, pool: str = "first", mode: str = "cutdown", seed: int = 7,
                rho: RhoConfig | None = None, shared: bool = True) -> DenoiseConfig:
    return DenoiseConfig(n_main=n, k_denoise=k, pool_sampling=pool, partial_mode=mode, seed=seed,
                         rho=rho or RhoConfig(strategy="fixed", value=0.2), shared_baseline=shared)


def make_rollout(kind: RowKind, accuracy: float, cont_len: int = 3, p: int = 0, max_tokens: int = 10,
                 reward: float | None = None, group_id: int = 0, slot: int = 0,
                 finish: str = "stop", fallback_reason=None) -> Rollout:
    prefix = None
    if p > 0:
        prefix = PrefixSpan(pool_index=0, source_num_tokens=max(p, 5), rho=0.2, length=p,
                            token_ids=tuple(range(100, 100 + p)))
    req = RolloutRequest(problem_uid=f"u{group_id}", group_id=group_id, slot=slot, kind=kind,
                         prompt_ids=(5, 6), prefix=prefix, max_tokens=max_tokens, seed=0,
                         fallback_reason=fallback_reason)
    comp = Completion(token_ids=tuple(range(200, 200 + cont_len)), finish_reason=finish)  # type: ignore[arg-type]
    return Rollout(request=req, completion=comp, reward=accuracy if reward is None else reward, accuracy=accuracy)
