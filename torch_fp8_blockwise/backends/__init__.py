"""Backends: one module (or package) per device family; see torch_fp8_blockwise._dispatch."""
