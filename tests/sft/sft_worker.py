"""Runs `python -m megatron_denoise.launch.sft` several times in ONE process (megatron is imported
once): argv lists as a JSON list in sys.argv[1]. Each run must exit 0 (75 when it passes
sft.stop_after); the exit codes are printed."""
import json
import sys

from megatron_denoise.launch import sft

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        rc = sft.main(argv)
        print(f"[sft_worker] {argv[-1]} -> {rc}", flush=True)
        if rc != (75 if any(a.startswith("sft.stop_after=") for a in argv) else 0):
            sys.exit(rc)
