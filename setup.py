"""unimm-jax: unified multimodal models (understand + generate images) in JAX/Flax."""
from setuptools import find_packages, setup

# `kernels/` lives at the top level of the repository (design card) but ships inside the
# wheel as `unimm_jax.kernels`, so an installed package can import it.
packages = find_packages(include=["unimm_jax", "unimm_jax.*"])
packages += ["unimm_jax.kernels"] + [
    "unimm_jax.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="unimm-jax",
    version="0.1.0",
    description="JAX/Flax unified multimodal models (Janus, Janus-Pro, JanusFlow, ...): "
    "train, sample, evaluate and convert on TPU/GPU meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"unimm_jax.kernels": "kernels"},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "importlib_resources",  # tensorflow-datasets needs it but only declares it for old Pythons
        "ml-collections",
        "clu",
        "tensorboard",  # its pure-python event writer (train/tensorboard.py); no TensorFlow
        "safetensors",
        "tokenizers",
        "numpy",
        "ml_dtypes",
        "pillow",
        "tqdm",
        "absl-py",
        "psutil",
    ],
    extras_require={
        # torch must be exactly 2.13.0 (a local CPU wheel); any other pin pulls CUDA packages.
        "torch": ["torch==2.13.0", "transformers>=5", "diffusers"],
        "test": [
            "torch==2.13.0",
            "transformers>=5",
            "diffusers",
            "pytest",
            "pytest-xdist",
            "hypothesis",
        ],
    },
    entry_points={
        "console_scripts": [
            # unimm-train / -generate / -chat / -eval are added with their issues (DESIGN.md names).
            "unimm-convert=unimm_jax.cli.convert:main",
            "unimm-generate=unimm_jax.cli.generate:main",
            "unimm-chat=unimm_jax.cli.chat:main",
            "unimm-train=unimm_jax.cli.train:run",
            "unimm-eval=unimm_jax.cli.eval:run",
        ]
    },
)
