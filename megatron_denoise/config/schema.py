"""The typed configuration tree: the single source of truth for every setting.

Defaults reproduce the paper's recommended DenoiseRL-GRPO run (METHOD.md section 6): N=12, K=4,
rho=0.2 fixed, cutdown, shared baseline, R=4096, lr 1e-6 constant, 16 problems per step,
temperature 1.0. YAML files hold only overrides (see `megatron_denoise.config.loader`).

Each field carries its documentation in `metadata["doc"]`; `describe()` prints them.
This module imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


def f(default: Any = None, doc: str = "", factory: Any = None):
    """A dataclass field with a docstring kept in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class RopeScalingConfig:
    type: Optional[str] = f(None, "RoPE scaling for long context: null | linear | dynamic | yarn | llama3")
    factor: float = f(1.0, "Scaling factor (context extension ratio)")
    original_max_position_embeddings: Optional[int] = f(None, "Pre-extension context length (yarn, llama3)")
    low_freq_factor: float = f(1.0, "llama3 scaling: low-frequency factor")
    high_freq_factor: float = f(4.0, "llama3 scaling: high-frequency factor")


@dataclass
class MoEConfig:
    num_experts: int = f(0, "Number of routed experts; 0 means a dense model")
    router_topk: int = f(2, "Experts each token is routed to")
    ffn_hidden_size: Optional[int] = f(None, "Per-expert FFN width (defaults to model.ffn_hidden_size)")
    aux_loss_coeff: float = f(1e-3, "Load-balancing auxiliary loss coefficient")
    token_dispatcher_type: str = f("alltoall", "Token dispatcher: allgather | alltoall")
    router_pre_softmax: bool = f(False, "Softmax before top-k (Mixtral) or after (Qwen3-MoE: False)")
    norm_topk_prob: bool = f(True, "Renormalise the top-k routing probabilities (Qwen3-MoE)")


@dataclass
class ModelConfig:
    family: str = f("qwen3", "Architecture family: llama | qwen2 | qwen3 | qwen3_moe")
    hf_path: Optional[str] = f(None, "Hugging Face model folder (weights, config.json, tokenizer) to start from")
    tokenizer_path: Optional[str] = f(None, "Tokenizer folder; defaults to hf_path")
    num_layers: int = f(36, "Transformer layers")
    hidden_size: int = f(2560, "Model width")
    ffn_hidden_size: int = f(9728, "Dense MLP width")
    num_attention_heads: int = f(32, "Query heads")
    num_query_groups: int = f(8, "Key/value heads (grouped-query attention)")
    kv_channels: Optional[int] = f(128, "Head dimension (defaults to hidden_size / num_attention_heads)")
    vocab_size: int = f(151936, "Vocabulary size of the tokenizer/embedding (unpadded)")
    max_position_embeddings: int = f(40960, "Maximum sequence length the positional encoding supports")
    rotary_base: float = f(1000000.0, "RoPE theta")
    rope_scaling: RopeScalingConfig = f(factory=RopeScalingConfig, doc="RoPE long-context scaling")
    norm_epsilon: float = f(1e-6, "RMSNorm epsilon")
    qkv_bias: bool = f(False, "Bias on the QKV projection (Qwen2/2.5: True)")
    qk_layernorm: bool = f(True, "RMSNorm on queries and keys per head (Qwen3: True)")
    tie_word_embeddings: bool = f(False, "Share input embedding and output layer")
    moe: MoEConfig = f(factory=MoEConfig, doc="Mixture-of-experts settings")
    params_dtype: str = f("bfloat16", "Parameter/compute dtype: float32 | bfloat16 | float16")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = f(1, "Tensor parallel size (tp)")
    pipeline_model_parallel_size: int = f(1, "Pipeline parallel size (pp)")
    virtual_pipeline_model_parallel_size: Optional[int] = f(None, "Interleaved (virtual) pipeline stages per rank (vpp); null = off")
    expert_model_parallel_size: int = f(1, "Expert parallel size (ep)")
    expert_tensor_parallel_size: Optional[int] = f(None, "Tensor parallel size inside experts (etp); null = tp")
    context_parallel_size: int = f(1, "Context parallel size (cp)")
    sequence_parallel: bool = f(False, "Megatron sequence parallelism (needs tp > 1; required for MoE with tp > 1)")
    use_distributed_optimizer: bool = f(True, "Shard optimizer state over data-parallel ranks")
    overlap_grad_reduce: bool = f(False, "Overlap gradient reduce-scatter with backward")


@dataclass
class ClusterConfig:
    num_nodes: int = f(1, "Nodes in the job")
    gpus_per_node: int = f(8, "Devices (GPUs, or CPU processes on CPU machines) per node")
    backend: str = f("auto", "Process-group backend: auto (nccl with GPUs, gloo without) | nccl | gloo")
    device: str = f("auto", "auto | cuda | cpu")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class PromptConfig:
    system: Optional[str] = f("you are a helpful assistant.", "System message (null: none)")
    user_suffix: str = f("\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
                         "Appended to the problem text in the user message")
    apply_chat_template: bool = f(True, "Render with the tokenizer's chat template and its generation header")


@dataclass
class DataConfig:
    train_files: list = f(factory=list, doc="Training parquet/JSONL files (reference schema, with wrong_answer_with_boxed)")
    val_files: list = f(factory=list, doc="Validation files or eval set names (aime24, aime25, amc23, math500, gsm8k)")
    prompt: PromptConfig = f(factory=PromptConfig, doc="Prompt template")
    max_prompt_length: int = f(1024, "P: maximum prompt tokens")
    max_response_length: int = f(4096, "R: maximum response tokens (prefix + continuation)")
    problems_per_step: int = f(16, "B: problems per training step")
    shuffle: bool = f(True, "Shuffle problems each epoch (seeded)")
    seed: int = f(42, "Data order seed")
    bad_rows: str = f("skip", "What to do with a malformed row: skip (report by index) | error")
    max_problems: Optional[int] = f(None, "Use only the first n problems (null: all)")


@dataclass
class RolloutConfig:
    engine: str = f("vllm", "Rollout engine: vllm | hf (transformers generate; tests and tiny demos)")
    colocate: bool = f(True, "Share devices with the actor; the engine sleeps during training on GPU")
    gpu_memory_utilization: float = f(0.6, "Engine memory fraction on GPU")
    enable_prefix_caching: bool = f(True, "Share the prompt KV cache across a problem's N+K rows")
    tensor_parallel_size: int = f(1, "Engine tensor parallel size")
    temperature: float = f(1.0, "Sampling temperature for training rollouts")
    top_p: float = f(1.0, "Nucleus sampling for training rollouts")
    top_k: int = f(-1, "Top-k sampling (-1: off)")
    enforce_eager: bool = f(False, "Disable CUDA graphs (always eager on CPU)")
    max_num_seqs: int = f(256, "Engine batch size limit")
    dtype: Optional[str] = f(None, "Engine dtype (null: model.params_dtype)")
    cpu_kvcache_space_gb: int = f(1, "KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    seed: int = f(0, "Base sampling seed; per-request seeds derive from it, the step and the row")


@dataclass
class RhoConfig:
    strategy: str = f("fixed", "Prefix ratio sampler: fixed | uniform | normal (clipped to [low, high])")
    value: float = f(0.2, "rho for the fixed strategy")
    low: float = f(0.1, "Lower bound (uniform, normal clip); in (0, 1]")
    high: float = f(0.5, "Upper bound (uniform, normal clip); in (0, 1]")
    mean: float = f(0.3, "Mean of the normal strategy")
    std: float = f(0.1, "Standard deviation of the normal strategy")


@dataclass
class DenoiseConfig:
    n_main: int = f(12, "N: ordinary rollouts per problem")
    k_denoise: int = f(4, "K: denoise rollouts per problem (0: plain GRPO/DAPO)")
    pool_sampling: str = f("random", "Wrong solution per slot: random (paper, seeded) | first (reference code)")
    rho: RhoConfig = f(factory=RhoConfig, doc="Prefix ratio")
    partial_mode: str = f("cutdown", "cutdown (grad on continuation, max_tokens R-p) | shift (grad on prefix too) | none (max_tokens R)")
    shared_baseline: bool = f(True, "All N+K rows of a problem share one advantage group (use_problem_id_as_uid)")
    pool_column: str = f("wrong_answer_with_boxed", "Column holding the weak model's wrong solutions")
    seed: int = f(1234, "Seed of pool sampling and rho, combined with the step and slot")


@dataclass
class KLConfig:
    coef: float = f(0.0, "KL penalty coefficient (0: off, as in the reference)")
    type: str = f("k3", "KL estimator: k1 | k3")


@dataclass
class DynamicSamplingConfig:
    enabled: bool = f(False, "DAPO dynamic sampling: drop problems with group accuracy exactly 0 or 1")
    max_gen_batches: int = f(10, "Give up (error) after this many generation batches without B survivors")


@dataclass
class OverlongConfig:
    enabled: bool = f(False, "DAPO overlong reward shaping")
    buffer: int = f(512, "Soft-penalty buffer length (tokens before R where the penalty ramps)")
    penalty_factor: float = f(1.0, "Penalty at full overlong")


@dataclass
class AlgorithmConfig:
    name: str = f("grpo", "Advantage/loss family: grpo | dapo | dr_grpo")
    std: str = f("unbiased", "GRPO std: unbiased (n-1, reference) | population (paper)")
    eps: float = f(1e-6, "Added to the group std")
    clip_low: float = f(0.2, "PPO clip epsilon below 1")
    clip_high: float = f(0.2, "PPO clip epsilon above 1 (DAPO clip-higher: 0.28)")
    dual_clip: Optional[float] = f(None, "Dual-clip c (e.g. 10) for negative advantages; null = off")
    loss_agg: str = f("token-mean", "token-mean (global) | seq-mean-token-sum | seq-mean-token-mean")
    force_on_policy: bool = f(True, "Old log-probs := detached current ones (ratio 1), as in the reference run")
    ppo_epochs: int = f(1, "Passes over the step's rows")
    mini_batches: int = f(1, "Optimizer updates per epoch")
    kl: KLConfig = f(factory=KLConfig, doc="KL penalty against the reference model")
    entropy_coeff: float = f(0.0, "Entropy bonus coefficient (entropy is always logged)")
    dynamic_sampling: DynamicSamplingConfig = f(factory=DynamicSamplingConfig, doc="DAPO dynamic sampling")
    overlong: OverlongConfig = f(factory=OverlongConfig, doc="DAPO overlong shaping")


@dataclass
class RewardConfig:
    num_workers: int = f(2, "Verifier worker processes (math-verify runs in them, sandboxed)")
    deadline_s: float = f(5.0, "Per-answer deadline in CPU seconds of a verifier worker (a loaded node does not time out a right answer); a timed-out answer scores 0 and is counted")
    max_answer_chars: int = f(2048, "Longer extracted answers score 0 without being parsed")


@dataclass
class OptimizerConfig:
    name: str = f("adam", "Optimizer: adam (AdamW) | sgd")
    lr: float = f(1e-6, "Peak learning rate")
    min_lr: float = f(0.0, "Final learning rate for decaying schedules")
    weight_decay: float = f(0.01, "Decoupled weight decay")
    adam_beta1: float = f(0.9, "Adam beta1")
    adam_beta2: float = f(0.999, "Adam beta2")
    adam_eps: float = f(1e-8, "Adam epsilon")
    clip_grad: float = f(1.0, "Gradient norm clip (0: off)")
    scheduler: str = f("constant", "LR schedule: constant | cosine | linear")
    warmup_steps: int = f(0, "Linear warmup steps")


@dataclass
class TrainerConfig:
    total_steps: int = f(500, "Training steps")
    micro_batch_tokens: int = f(16384, "Token budget per micro-batch (sequence packing)")
    seed: int = f(1, "Model init / dropout seed")
    test_freq: int = f(10, "Validate every n steps (0: never)")
    nan_guard: bool = f(True, "Skip an update whose loss or grad norm is NaN/Inf, and report it")


@dataclass
class CheckpointConfig:
    dir: str = f("runs/default/checkpoints", "Checkpoint folder")
    save_interval: int = f(50, "Save every n steps (and at exit)")
    keep_last: int = f(3, "Checkpoints kept (older ones deleted after a successful save)")
    resume: str = f("auto", "auto (newest complete checkpoint) | none | a checkpoint path")
    export_hf_at_end: bool = f(True, "Export the final policy as a Hugging Face folder")
    optimizer_format: str = f("dp_reshardable", "Distributed-optimizer state on disk: dp_reshardable (every rank "
                              "writes its own shard, fastest; the optimizer resumes only at the same layout) | "
                              "fully_reshardable (gathered per model-parallel shard on its DP rank 0 at save; "
                              "resumes at any tp/pp/dp/ep layout). Weights reshard either way")


@dataclass
class LoggingConfig:
    output_dir: str = f("runs/default", "Run folder: metrics, TensorBoard, plots")
    jsonl: bool = f(True, "Write metrics.jsonl")
    tensorboard: bool = f(True, "Write TensorBoard event files")
    wandb: bool = f(False, "Log to Weights & Biases (offline-safe)")
    wandb_project: str = f("megatron-denoise", "W&B project")
    wandb_mode: str = f("offline", "W&B mode: offline | online | disabled")
    progress: bool = f(True, "Show a progress bar")


@dataclass
class EvalConfig:
    sets: list = f(factory=lambda: ["aime24", "aime25", "amc23", "math500"], doc="Eval sets")
    k: dict = f(factory=lambda: {"aime24": 16, "aime25": 16, "amc23": 16, "math500": 1},
                doc="AVG@k samples per problem, per set")
    temperature: float = f(0.6, "Eval sampling temperature")
    top_p: float = f(0.95, "Eval nucleus sampling")
    max_problems: Optional[int] = f(None, "Evaluate only the first n problems of each set")


@dataclass
class Config:
    """The whole run."""
    name: str = f("denoise-grpo", "Run name")
    model: ModelConfig = f(factory=ModelConfig, doc="Policy model")
    parallel: ParallelConfig = f(factory=ParallelConfig, doc="Actor parallelism")
    cluster: ClusterConfig = f(factory=ClusterConfig, doc="Nodes and devices")
    data: DataConfig = f(factory=DataConfig, doc="Data and lengths")
    rollout: RolloutConfig = f(factory=RolloutConfig, doc="Rollout engine")
    denoise: DenoiseConfig = f(factory=DenoiseConfig, doc="DenoiseRL rollouts")
    algorithm: AlgorithmConfig = f(factory=AlgorithmConfig, doc="Advantages and loss")
    reward: RewardConfig = f(factory=RewardConfig, doc="Verifiable math reward")
    optimizer: OptimizerConfig = f(factory=OptimizerConfig, doc="Optimizer and schedule")
    trainer: TrainerConfig = f(factory=TrainerConfig, doc="Training loop")
    checkpoint: CheckpointConfig = f(factory=CheckpointConfig, doc="Checkpointing")
    logging: LoggingConfig = f(factory=LoggingConfig, doc="Logging")
    eval: EvalConfig = f(factory=EvalConfig, doc="Evaluation")


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted key, default and docstring."""
    import dataclasses
    out = []
    inst = cls()
    for fl in fields(cls):
        key = f"{prefix}{fl.name}"
        val = getattr(inst, fl.name)
        if dataclasses.is_dataclass(val):
            out.extend(describe(type(val), key + "."))
        else:
            out.append(f"{key} = {val!r}  # {fl.metadata.get('doc', '')}")
    return out
