"""The arms of the science benchmark: each a set of config overrides on the testbed run, at a
matched rollout budget (every arm generates the same N + K rows per problem, for the same problems
per step and the same steps, from the same warm-start and pool).

The budget is `rows` rows per problem (default 8): GRPO gets N = rows, K = 0; DenoiseRL gets
N = rows - K, K denoise rows.

Beyond the paper (issue 18), each at the `denoise` arm's budget (N = rows - rows/4, K = rows/4):
- denoise-adaptive: rho from a global controller steering the denoise pass rate toward 0.5
  (start 0.2, within [0.05, 0.8], gain 0.1 per step), offline pool as in `denoise`.
- denoise-online / denoise-mixed / denoise-correct: prefixes from the policy's own recent main
  rollouts (wrong boxed ones; mixed: half of the slots from the prepared pool when both have an entry;
  correct: verified correct ones). An online pool only acts when problems come back: the testbed's
  60 steps x 8 problems never revisit one of its 512 problems, so these arms and their control
  `denoise-p64` (the paper's method) train on the first 64 problems (each seen ~7.5 times).
"""
from __future__ import annotations


# the online-pool arms and their control: a problem set small enough that problems come back
P64 = ("data.max_problems=64",)


def arm_overrides(name: str, rows: int = 8) -> list[str]:
    """Config overrides of one arm; unknown names raise, listing the known ones."""
    def denoise(k: int, *extra: str) -> list[str]:
        if not 0 < k < rows:
            raise ValueError(f"arm {name}: K={k} must be in (0, {rows})")
        return [f"denoise.n_main={rows - k}", f"denoise.k_denoise={k}", *extra]

    table = {  # values are thunks: only the chosen arm is built (and checked against `rows`)
        # the baselines and the paper's method (METHOD.md: N=12, K=4 of 16; here K = rows / 4)
        "grpo": lambda: [f"denoise.n_main={rows}", "denoise.k_denoise=0"],
        "denoise": lambda: denoise(rows // 4),
        # K
        "denoise-k2": lambda: denoise(2),
        "denoise-k4": lambda: denoise(4),
        # the prefix ratio rho
        "rho0.2": lambda: denoise(rows // 4, "denoise.rho.strategy=fixed", "denoise.rho.value=0.2"),
        "rho0.5": lambda: denoise(rows // 4, "denoise.rho.strategy=fixed", "denoise.rho.value=0.5"),
        "rho0.8": lambda: denoise(rows // 4, "denoise.rho.strategy=fixed", "denoise.rho.value=0.8"),
        "rho-uniform": lambda: denoise(rows // 4, "denoise.rho.strategy=uniform", "denoise.rho.low=0.1",
                               "denoise.rho.high=0.8"),
        # the partial modes (paper: shift collapses, none costs 1.8 points)
        "shift": lambda: denoise(rows // 4, "denoise.partial_mode=shift"),
        "none": lambda: denoise(rows // 4, "denoise.partial_mode=none"),
        # DAPO: dynamic sampling, clip-higher, token-level loss
        "dapo": lambda: denoise(rows // 4, "algorithm.name=dapo", "algorithm.dynamic_sampling.enabled=true",
                        "algorithm.clip_high=0.28", "algorithm.loss_agg=token-mean"),
        # beyond the paper (issue 18)
        "denoise-adaptive": lambda: denoise(rows // 4, "denoise.rho.strategy=adaptive", "denoise.rho.value=0.2",
                                            "denoise.rho.low=0.05", "denoise.rho.high=0.8", "denoise.rho.target=0.5",
                                            "denoise.rho.gain=0.1", "denoise.rho.scope=global"),
        "denoise-p64": lambda: denoise(rows // 4, *P64),
        "denoise-online": lambda: denoise(rows // 4, *P64, "denoise.pool_source=online"),
        "denoise-mixed": lambda: denoise(rows // 4, *P64, "denoise.pool_source=mixed", "denoise.online_pool.share=0.5"),
        "denoise-correct": lambda: denoise(rows // 4, *P64, "denoise.pool_source=online", "denoise.prefix_kind=correct"),
        "grpo-dapo": lambda: [f"denoise.n_main={rows}", "denoise.k_denoise=0", "algorithm.name=dapo",
                      "algorithm.dynamic_sampling.enabled=true", "algorithm.clip_high=0.28"],
    }
    if name not in table:
        raise ValueError(f"unknown arm {name!r}; known arms: {', '.join(table)}")
    return table[name]()
