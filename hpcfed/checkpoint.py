"""Public checkpoint API: ``hpcfed.checkpoint.load_state_dict(path)``."""

from hpcfed.io.checkpoint import list_checkpoints, load_checkpoint, load_latest, load_state_dict

__all__ = ["list_checkpoints", "load_checkpoint", "load_latest", "load_state_dict"]
