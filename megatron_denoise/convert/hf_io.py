"""Reading and writing Hugging Face safetensors folders.

Reading is lazy: ``HFReader`` opens every shard with ``safe_open`` and reads a tensor, or only a
slice of it along one dimension (what a tensor-parallel rank needs), without loading the rest.
Writing streams (name, tensor) pairs into shards of a bounded size and writes the index json
(``model.safetensors.index.json``) that transformers and vLLM use to find them.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

INDEX = "model.safetensors.index.json"
# Files of a source model that are copied verbatim into an exported folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class HFReader:
    """Lazy access to the tensors of a safetensors folder (single file or sharded with index)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.isfile(index):
            with open(index) as fh:
                weight_map: dict[str, str] = json.load(fh)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {folder}")
            weight_map = {}
            for fname in files:
                with safe_open(os.path.join(folder, fname), framework="pt") as fh:
                    for k in fh.keys():
                        weight_map[k] = fname
        self.weight_map = weight_map
        self._handles = {}
        for fname in sorted(set(weight_map.values())):
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{INDEX} in {folder} names {fname}, which does not exist")
            self._handles[fname] = safe_open(path, framework="pt")

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)

    def get_range(self, name: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        """The slice [start, stop) along ``dim`` (None: the whole tensor), reading only that part."""
        if dim is None:
            return self.get(name)
        sl = self._handles[self.weight_map[name]].get_slice(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


@dataclass
class WriteSummary:
    folder: str
    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    dtype: Optional[str] = None   # of the floating-point tensors written, e.g. "bfloat16"


def write_hf_shards(named: Iterable[tuple[str, torch.Tensor]], folder: str,
                    max_shard_bytes: int = 2 * 1024 ** 3, dtype: Optional[torch.dtype] = None,
                    on_tensor=None) -> WriteSummary:
    """Write (name, tensor) pairs as model-0000i-of-0000n.safetensors plus the index json.
    ``on_tensor(name, nbytes)`` is called after each tensor (progress bars)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    summary = WriteSummary(folder)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    tmp_files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        tmp = f"model-{len(tmp_files) + 1:05d}.tmp.safetensors"
        save_file(shard, os.path.join(folder, tmp), metadata={"format": "pt"})
        tmp_files.append((tmp, list(shard)))
        shard, shard_bytes = {}, 0

    seen = set()
    for name, t in named:
        if name in seen:
            raise ValueError(f"tensor {name} produced twice")
        seen.add(name)
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous().clone()  # own storage: safetensors refuses shared or strided tensors
        if t.is_floating_point() and summary.dtype is None:
            summary.dtype = str(t.dtype).replace("torch.", "")
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        summary.tensors += 1
        summary.bytes += nbytes
        summary.names.append(name)
        if on_tensor is not None:
            on_tensor(name, nbytes)
    flush()
    n = len(tmp_files)
    weight_map = {}
    for i, (tmp, names) in enumerate(tmp_files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, tmp), os.path.join(folder, final))
        summary.files.append(final)
        weight_map.update({k: final for k in names})
    with open(os.path.join(folder, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": summary.bytes}, "weight_map": dict(sorted(weight_map.items()))},
                  fh, indent=2)
    return summary


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for fname in TOKENIZER_FILES:
        p = os.path.join(src, fname)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, fname))
            copied.append(fname)
    return copied


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
