"""megacca: pretraining + alignment (CCA, DPO) of unified text/image-token AR transformers.

CPU installs (and CI) pin torch and megatron-core through requirements/cpu.txt; a GPU user keeps the CUDA torch
already installed: `pip install -e .` then, optionally, `pip install -e .[gpu]` (flash-attn; apex and
Transformer Engine are built from source, see README).
"""
from setuptools import find_packages, setup

setup(
    name="megacca",
    version="0.1.0",
    description="Unified multimodal AR pretraining and Condition Contrastive Alignment on megatron-core + DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megacca", "megacca.*"]),
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16.1,<0.17",
        "deepspeed>=0.19",
        # The zero_to_fp32.py that DeepSpeed copies into every checkpoint imports it (split_torch_state_dict_into_shards,
        # for its default sharded output); DeepSpeed itself does not depend on it.
        "huggingface_hub>=0.23",
        "sentencepiece>=0.2",
        "webdataset>=0.2.100",
        "tensorboard>=2.14",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "pillow",
        "scikit-learn",
        # sample grids and the fidelity/diversity plot of `megacca sweep` and the demo
        "matplotlib",
    ],
    extras_require={
        # transformers: the Hugging Face export is checked against its LlamaForCausalLM (tests only)
        "test": ["pytest>=8", "transformers>=4.45"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["megacca=megacca.cli:main"]},
)
