"""Activation tools: what autograd saves for backward and the hooks that compress it
(:mod:`~surgery.activations.memory`), and the sparsity a Sparsifier reaches
(:mod:`~surgery.activations.sparsity`).
"""
from .memory import ActivationMemory, activation_memory, saved_tensors_hooks
from .sparsity import activation_sparsity, harden

__all__ = ["ActivationMemory", "activation_memory", "saved_tensors_hooks", "activation_sparsity", "harden"]
