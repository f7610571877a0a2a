"""The machinery the Ray Data batch jobs share: the decode -> model -> write pipeline and its actor
layout (`pipeline`), shard planning (`shards`), exactly-once commits (`commit`), prediction rows
and the part files that hold them (`rows`), and Ray start-up (`cluster`).

May import talora.io and talora.backbones (frame decoding); never a model."""
