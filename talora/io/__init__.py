"""Bytes in and out: object storage through fsspec (local paths, s3://, any fsspec URI), safetensors
weight files, and image decoding/encoding.

The ground floor: imports nothing of talora, so every other package (and the torch-free decode
workers) may import it."""
