"""Fused ops for the PACL head. Imports nothing from ``pacl_fast``.

``reference`` is plain PyTorch and defines the numbers; every fast op is tested against it.
"""
