"""A Hugging Face model folder checked before any engine or worker starts (issue 17).

The checks that would otherwise fail deep inside a Ray worker, a vLLM engine or a safetensors
reader with a message that names neither the folder nor the file:

- config.json exists, is JSON, and names an architecture the megatron model builds;
- the weights: every shard the index names exists, and no shard is shorter than its own header
  says (a truncated download or copy); the header is read, the tensors are not;
- the tokenizer fits the model: every token id it can produce has a row in the embedding
  (len(tokenizer) <= vocab_size; a larger, padded embedding is normal).

    check_model_folder(path, tokenizer=None) -> config dict   (raises ModelFolderError)
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Optional

from megatron_denoise.convert.errors import ConversionError
from megatron_denoise.convert.hf_config import family_of
from megatron_denoise.convert.hf_io import INDEX

_HEADER_LIMIT = 100 << 20  # safetensors caps headers at 100 MB


class ModelFolderError(ConversionError):
    """A model folder that cannot be used; the message names the folder and the file."""


def shard_error(path: str) -> Optional[str]:
    """Why a .safetensors file is unusable (None: its header is readable and the file is as long
    as the header says)."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{path} is truncated: {size} bytes, shorter than the 8-byte safetensors header length"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _HEADER_LIMIT or 8 + n > size:
            return (f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the file has "
                    f"{size}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{path}: unreadable safetensors header ({e})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return (f"{path} is truncated: {size} bytes, its header describes {8 + n + end} "
                f"({8 + n + end - size} missing)")
    return None


def check_model_folder(folder: str, tokenizer: Any = None) -> dict:
    """Raise ModelFolderError naming the file for the first thing that makes `folder` unusable;
    return its config.json."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelFolderError(f"model folder {folder}: no config.json")
    try:
        with open(cfg_path) as fh:
            hf = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{cfg_path}: not valid JSON ({e})") from None
    family_of(hf, source=cfg_path)  # UnknownArchitectureError names the architecture and the file

    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{index}: not a safetensors index ({e!r})") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ModelFolderError(f"{index} names {len(missing)} shard(s) that do not exist in {folder}: "
                                   f"{', '.join(missing)}")
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ModelFolderError(f"model folder {folder}: no *.safetensors weights")
    for f in files:
        why = shard_error(os.path.join(folder, f))
        if why:
            raise ModelFolderError(why)

    if tokenizer is not None:
        vocab = int(hf.get("vocab_size") or 0)
        n_tok = len(tokenizer)
        if vocab and n_tok > vocab:
            raise ModelFolderError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', None) or folder} has {n_tok} tokens but "
                f"{cfg_path} has vocab_size {vocab}: token ids >= {vocab} would index past the embedding; "
                f"use the tokenizer the model was trained with (model.tokenizer_path)")
    return hf
