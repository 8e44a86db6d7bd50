from setuptools import find_packages, setup

setup(
    name="grpo-kernels",
    version="0.1.0",
    description=(
        "Fused Triton kernels for GRPO-family RL post-training: per-token log-probs and entropy "
        "from hidden states without materializing logits, the GRPO loss family, group advantages."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["grpo_kernels", "grpo_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.1",
        # triton's CPU interpreter (TRITON_INTERPRET=1) breaks with numpy >= 2.3
        "numpy<2.3",
    ],
    extras_require={
        "train": ["transformers>=4.46", "pyyaml", "tqdm", "matplotlib"],
        "trl": ["trl>=1.16,<1.17", "transformers>=4.46", "accelerate", "datasets"],
        "bench": ["cut-cross-entropy>=25.1", "liger-kernel>=0.8.5", "matplotlib", "pytest-benchmark"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "transformers>=4.46",
            "accelerate",
            "datasets",
            "peft",
            "pyyaml",
            "tqdm",
            "matplotlib",
            "liger-kernel>=0.8.5",
            "cut-cross-entropy>=25.1",
            "trl>=1.16,<1.17",
        ],
    },
    entry_points={"console_scripts": ["grpo-kernels-train=grpo_kernels.train.__main__:main"]},
)
