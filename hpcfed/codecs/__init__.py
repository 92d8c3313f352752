"""Codecs: a flat float32 vector to bytes and back (see base.py)."""

from hpcfed.codecs.base import Codec, CodecError
from hpcfed.codecs.identity import IdentityCodec

__all__ = ["Codec", "CodecError", "IdentityCodec"]
