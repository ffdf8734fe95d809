"""Torch-aware layer: state encoding and state I/O (knows torch, not Prefect)."""

from .encoding import DTYPES, UnsupportedValueError, decode_tree, encode_state
from .state_io import load_state, save_state

__all__ = ["DTYPES", "UnsupportedValueError", "decode_tree", "encode_state", "load_state", "save_state"]
