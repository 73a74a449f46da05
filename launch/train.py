"""Train a policy with DenoiseRL.

    python -m megatron_denoise.launch.train [--config FILE] [--dry-run] [--world-size W] [key=value ...]

Without --config the embedded default runs: configs/testbed-denoise-grpo-cpu-1n1g.yaml, the science
testbed on CPU (task generation -> warm-start of a from-scratch 1.1M-parameter Llama -> weak-model
pool -> DenoiseRL-GRPO -> held-out accuracy before and after RL). The config's `prepare:` section
runs first (each stage skipped when its output exists); --prepare-only stops after it.
--dry-run validates the config against the world size (default: cluster.num_nodes x
cluster.gpus_per_node) and prints the resolved layout and rollout plan without starting anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.config.schema import Config
from megatron_denoise.layout import ParallelLayout

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "testbed-denoise-grpo-cpu-1n1g.yaml"


def rollout_plan(cfg: Config, layout: ParallelLayout) -> dict:
    """What one step generates and trains on, in rows and tokens (upper bounds where p is unknown)."""
    d, dn = cfg.data, cfg.denoise
    B, N, K, P, R = d.problems_per_step, dn.n_main, dn.k_denoise, d.max_prompt_length, d.max_response_length
    rows = B * (N + K)
    capped = dn.partial_mode in ("cutdown", "shift")
    # with a fixed rho, p ~= rho * |w|; |w| <= R gives an upper bound on tokens saved by the R - p cap
    saved_bound = int(B * K * dn.rho.value * R) if (capped and dn.rho.strategy == "fixed") else None
    return {
        "problems_per_step": B,
        "rows_per_step": rows,
        "main_rows": B * N,
        "denoise_rows": B * K,
        "max_generated_tokens": rows * R,
        "max_tokens_per_step": rows * (P + R),
        "denoise_max_tokens": "R - p" if capped else "R",
        "tokens_saved_by_cap_upper_bound": saved_bound,
        "rows_per_dp_rank": rows // layout.dp,
        "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
        "min_micro_batches_per_dp_rank": -(-(rows // layout.dp) * (P + R) // cfg.trainer.micro_batch_tokens),
        "optimizer_steps_per_step": cfg.algorithm.ppo_epochs * cfg.algorithm.mini_batches,
    }


def dry_run(cfg: Config, world_size: int) -> str:
    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    plan = rollout_plan(cfg, layout)
    lines = [f"config OK: {cfg.name}",
             f"model: {cfg.model.family} layers={cfg.model.num_layers} hidden={cfg.model.hidden_size} "
             f"heads={cfg.model.num_attention_heads}/{cfg.model.num_query_groups} experts={cfg.model.moe.num_experts}",
             f"layout: {layout.describe()}",
             f"algorithm: {cfg.algorithm.name} loss_agg={cfg.algorithm.loss_agg} force_on_policy={cfg.algorithm.force_on_policy}"
             f" | denoise N={cfg.denoise.n_main} K={cfg.denoise.k_denoise} mode={cfg.denoise.partial_mode}"
             f" rho={cfg.denoise.rho.strategy} pool={cfg.denoise.pool_sampling}",
             f"loss_impl: {cfg.algorithm.loss_impl}",
             f"policy_loss: {cfg.algorithm.policy_loss} kl: coef={cfg.algorithm.kl.coef} type={cfg.algorithm.kl.type}"
             f" use={cfg.algorithm.kl.use} | mismatch: metrics={cfg.algorithm.mismatch.metrics}"
             f" tis_cap={cfg.algorithm.mismatch.tis_cap}"
             f" seq_mask=[{cfg.algorithm.mismatch.seq_mask_low}, {cfg.algorithm.mismatch.seq_mask_high}]",
             "rollout plan:"]
    lines += [f"  {k}: {v}" for k, v in plan.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="YAML config (default: the science testbed)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    ap.add_argument("--world-size", type=int, default=None, help="world size to validate against")
    ap.add_argument("--prepare-only", action="store_true",
                    help="carry out the prepare: section (task files, warm-start, pool) and stop before training")
    ap.add_argument("--verbose", action="store_true",
                    help="show everything on the console (default: third-party warnings and logs go to "
                         "<run>/logs/<process>.log; the console shows the run's own lines and progress bars)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. denoise.k_denoise=4")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.config or DEFAULT_CONFIG
    try:
        cfg = load_config(path, args.overrides, world_size=args.world_size)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    world_size = args.world_size or cfg.cluster.world_size
    if args.dry_run:
        print(dry_run(cfg, world_size))
        return 0
    from megatron_denoise.console import quiet_console

    with quiet_console(cfg.logging.output_dir, verbose=args.verbose) as log_file:
        if log_file is not None:
            print(f"[megatron-denoise] warnings and library logs: {log_file.parent}/", flush=True)
        from megatron_denoise.prepare.stage import prepare_run

        prepare_run(cfg)  # task files, warm-start, weak-model pool: each skipped when already done
        if args.prepare_only:
            return 0
        from megatron_denoise.trainer.run import run_training  # heavy: engines load from here on

        return run_training(cfg, config_path=path, overrides=args.overrides)


if __name__ == "__main__":
    sys.exit(main())
