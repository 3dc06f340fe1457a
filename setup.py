"""t5dual: T5.1.1 dual encoders with SamToNe in JAX/Flax."""

from setuptools import find_packages, setup

# Two tested sets of pins, chosen by the Python version (jax >= 0.11 needs Python >= 3.12):
#   Python 3.11: jax 0.10.2 / flax 0.12.8, the development machine and CI (2026-11-23);
#   Python >= 3.12: jax 0.11.2 / flax 0.12.10 / transformers 5.17.0, the GPU host's versions
#     (constraints/gpu-host.txt), checked by scripts/check_gpu_host_versions.sh.
PY311, PY312 = 'python_version < "3.12"', 'python_version >= "3.12"'
JAX = {PY311: '0.10.2', PY312: '0.11.2'}


def by_python(name, versions):
  """One requirement per Python range: name==version; marker."""
  return [f'{name}=={version}; {marker}' for marker, version in versions.items()]


CORE = by_python('jax', JAX) + by_python('jaxlib', JAX) + by_python(
    'flax', {PY311: '0.12.8', PY312: '0.12.10'}) + [
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
    # export.py --parquet (t5dual/export.py imports it only then).
    'pyarrow==26.0.1',
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
    'sentence-transformers==6.2.0',
] + by_python('transformers', {PY311: '5.23.0', PY312: '5.17.0'})
# The suite runs in 2 worker processes (pytest-xdist), a test file per worker.
TEST = ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'execnet==2.1.2'] + TORCH

setup(
    name='t5dual',
    version='0.1.0',
    description='T5.1.1 dual encoders (SDE / ADE / ADE-SPL) with SamToNe, in JAX/Flax',
    packages=find_packages(include=['t5dual', 't5dual.*']),
    python_requires='>=3.11',
    install_requires=CORE,
    extras_require={
        'seqio': SEQIO,
        'torch': TORCH,
        'test': TEST,
        'demo': [],
        # The accelerator's runtime for the pinned jax, as jax[tpu] / jax[cuda12] pin them;
        # scripts/run.sh and the launchers choose one (t5dual/accelerator.py).
        # libtpu: TPU VMs, and scripts/plan.py compiling for TPU topologies from any host.
        'tpu': by_python('libtpu', {PY311: '0.0.42.1', PY312: '0.0.48.1'}),
        # jax's CUDA 12 plugin and PJRT runtime with the NVIDIA wheels (cuDNN, cuBLAS, ...).
        'cuda': by_python('jax-cuda12-plugin[with-cuda]', JAX) + by_python('jax-cuda12-pjrt', JAX),
        'all': SEQIO + TEST,
    },
)
