"""Checkpoint conversion between Hugging Face folders and megatron-core.

Structure (pure modules first; megatron-core and torch.distributed are imported lazily by the
modules that need them):

- ``errors``     the typed errors every conversion raises (naming tensors, keys and shapes).
- ``transforms`` named tensor transforms: QKV fuse/split for grouped-query attention, gate/up
                 fuse/split, expert stacking, TP shard/unshard, vocab padding.
- ``sharding``   where a rank sits: TP/PP(+VPP)/EP/ETP coordinates, PP layer renumbering and EP
                 expert slicing.
- ``tables``     ONE declarative name table per family (llama, qwen2, qwen3, qwen3_moe) from
                 megatron-core names to Hugging Face names; the reverse direction is derived by
                 inverting the expanded table.
- ``hf_config``  config.json <-> typed ``ModelConfig`` (and generation_config.json).
- ``hf_io``      lazy safetensors reading (sliced per rank) and sharded writing with an index.
- ``megatron_io`` megatron-core model <-> canonical names: loading HF weights into a (sharded)
                 model and gathering the model's weights back as HF (name, tensor) pairs.
- ``pipeline``   end-to-end: HF folder -> megatron-core distributed checkpoint, distributed
                 checkpoint -> HF folder.
"""
