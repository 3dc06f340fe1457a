"""t5dual: T5.1.1 dual encoders with SamToNe in JAX/Flax."""

from setuptools import find_packages, setup

# Versions seen working together (CPU, Python 3.11, 2026-11-23).
CORE = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'gin-config==0.5.0',
    'sentencepiece==0.2.3',
    'bm25s==0.3.16',
    'PyStemmer==3.1.0',
    'tensorstore==0.1.86',
    'safetensors==0.8.0',
    'msgpack==1.2.4',
    'numpy==2.4.6',
    'tqdm==4.70.1',
    'tensorboardX==2.6.5',
    'rax==0.4.0',
    'pytrec-eval-terrier==0.5.11',
    'ir-measures==0.4.3',
    'matplotlib==3.11.2',
    'scikit-learn==1.9.1',
]
# TensorFlow-based data sources (seqio tasks, TFDS); optional on accelerator hosts.
SEQIO = [
    'seqio==0.0.20',
    'tensorflow==2.21.0',
    'tensorflow-text==2.21.1',
    'tensorflow-datasets==4.9.10',
]
# PyTorch interop, and the independent references the tests compare against.
TORCH = [
    'torch==2.13.0',
    'transformers==5.23.0',
    'sentence-transformers==6.2.0',
]
# The suite runs in 2 worker processes (pytest-xdist), a test file per worker.
TEST = ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'execnet==2.1.2'] + TORCH

setup(
    name='t5dual',
    version='0.1.0',
    description='T5.1.1 dual encoders (SDE / ADE / ADE-SPL) with SamToNe, in JAX/Flax',
    packages=find_packages(include=['t5dual', 't5dual.*']),
    python_requires='>=3.10',
    install_requires=CORE,
    extras_require={
        'seqio': SEQIO,
        'torch': TORCH,
        'test': TEST,
        'demo': [],
        # libtpu as jax[tpu]==0.10.2 pins it: TPU hosts, and scripts/plan.py compiling for
        # TPU topologies from any host.
        'tpu': ['libtpu==0.0.42.1'],
        'all': SEQIO + TEST,
    },
)
