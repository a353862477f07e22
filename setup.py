"""pgf: N:M structured sparsity training for Transformers in JAX/Flax."""

import setuptools

setuptools.setup(
    name='pgf',
    version='0.1.0',
    description=('Progressive Gradient Flow: N:M sparse training of '
                 'Transformers (ViT, SwinV2, T5) in JAX/Flax.'),
    # The experiment configs ship as pgf.configs (a checkout's configs/ is a
    # link to pgf/configs, so --config=configs/vit_base.py works there); no
    # top-level 'configs' package to collide with other projects.
    packages=setuptools.find_packages(include=['pgf', 'pgf.*']),
    python_requires='>=3.10',
    # Lower bounds: the versions this repository is tested with in CI
    # (jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax 0.12.8, grain 0.2.18,
    # tfds 4.9.10), rounded down to the release lines with the same APIs.
    install_requires=[
        'absl-py>=2.1',
        'array_record>=0.7',
        'clu>=0.0.12',
        'etils[epath]>=1.10',
        'flax>=0.11',
        'grain>=0.2.12',
        # TFDS needs it to prepare builders that live in a package (pgf's).
        'importlib_resources>=6.0',
        'jax>=0.7',
        'matplotlib>=3.8',
        'ml_collections>=1.0',
        # Compiles the CPU N:M inference kernels (pgf.inference.cpu) and the
        # CPU mask kernel (pgf.sparsity.mask_kernel).
        'numba>=0.60',
        'numpy>=1.26',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.20',
        'pillow>=10.0',
        'scikit-learn>=1.3',  # ships the embedded default images (digits)
        'sentencepiece>=0.2',
        'tensorboardX>=2.6',
        'tensorflow-datasets>=4.9.8',
        # Intel oneTBB: numba runs its parallel kernels on TBB where it is
        # installed (else on OpenMP, whose fork and join cost most of a
        # small kernel's call; measured in pgf.sparsity.mask_kernel's
        # docstring). Wheels: Linux x86-64 and Windows; elsewhere numba
        # keeps OpenMP.
        'tbb>=2021.6; (sys_platform == "linux" and platform_machine == '
        '"x86_64") or (sys_platform == "win32" and platform_machine == '
        '"AMD64")',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'ruff>=0.6'],
        # Only for preparing image datasets with TFDS's own builders
        # (e.g. imagenet2012 JPEG decoding) and tf.data loading.
        'tf': ['tensorflow>=2.16'],
    },
)
