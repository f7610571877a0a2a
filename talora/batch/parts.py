"""Part formats: how a part file's rows become bytes and back, chosen by name (`PART_FORMATS`).

Every batch job writes its rows through the commit protocol (`talora.batch.commit`) in the part
format it was given; the format's name is part of the run key (a run in another format is another
run), and readers decode each part by its file's suffix, so runs written in any format read the
same way. A second format = one class with `name`, `suffix`, `encode` and `decode` plus its entry
in `PART_FORMATS`; the jobs' `--part-format` flag then offers it.
"""

from __future__ import annotations

import io
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq


class PartFormat(Protocol):
    name: str  # what --part-format takes
    suffix: str  # the part files' suffix, e.g. ".parquet"

    def encode(self, rows: list[dict], schema: pa.Schema | None) -> bytes: ...

    def decode(self, data: bytes) -> pa.Table: ...


class ParquetParts:
    """Part files as Parquet: what Ray Data, pyarrow.dataset and pandas read as they are."""

    name = "parquet"
    suffix = ".parquet"

    def encode(self, rows: list[dict], schema: pa.Schema | None) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
        return buffer.getvalue()

    def decode(self, data: bytes) -> pa.Table:
        return pq.read_table(io.BytesIO(data))


PARQUET = ParquetParts()
PART_FORMATS: dict[str, PartFormat] = {f.name: f for f in (PARQUET,)}
DEFAULT_PART_FORMAT = PARQUET.name


def part_format(name: str) -> PartFormat:
    if name not in PART_FORMATS:
        raise ValueError(f"--part-format must be one of {tuple(PART_FORMATS)}, got {name!r}")
    return PART_FORMATS[name]


def part_format_of(uri: str) -> PartFormat:
    """The format of a part file, by its suffix."""
    for f in PART_FORMATS.values():
        if uri.endswith(f.suffix):
            return f
    raise ValueError(f"{uri}: not a part file of a known format ({sorted(f.suffix for f in PART_FORMATS.values())})")
