from setuptools import setup

setup(
    name="shakespeare-transformer",
    version="0.1.0",
    description="A character-level GPT trainer: einsum GPT, DeepSpeed ZeRO, zstd shards, Hydra configs",
    python_requires=">=3.10",
    packages=["model", "data", "trainer", "launch"],
    install_requires=[
        "torch>=2.6",         # torch.nn.utils.get_total_norm; fused AdamW on CPU (2.4)
        # trainer/deepspeed_compat.py: 0.19.5 and older halve a gradient accumulated over micro-batches;
        # the suite has passed with 0.19.6 and 0.19.8; that module lists the internals a new release may break
        "deepspeed>=0.19.6,<0.20",
        "hydra-core>=1.3",
        "einops>=0.7",
        "zstandard>=0.22",
        "anyascii>=0.3",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "ruff>=0.6", "pyarrow>=14.0.1",
                 "wandb>=0.17.1", "vastai==1.9.1"],
        "wiki": ["pyarrow>=14.0.1", "huggingface_hub>=0.23"],
        "hf": ["transformers>=5.0", "safetensors>=0.4", "tokenizers>=0.21"],  # launch/export.py (tested
                                    # with transformers 5.24, safetensors 0.8, tokenizers 0.23)
        "wandb": ["wandb>=0.17.1"],  # resume_from (rewind) arrived in 0.17.1
        "vast": ["vastai==1.9.1"],  # the tests pass with this one; its CLI lacks the overlay commands,
                                    # so launch/vast.py calls its Python SDK
    },
)
