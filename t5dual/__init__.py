"""t5dual: T5.1.1 dual encoders (SDE / ADE / ADE-SPL) with SamToNe, in JAX/Flax."""

__version__ = '0.1.0'
