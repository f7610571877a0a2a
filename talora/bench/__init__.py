"""Benchmarks: the speed suite (`speed`), the quality suite (`quality`), the GPU check (`gpu`),
the labelling scale plan (`scale`), the demo-models report (`demo_models`).

May import any talora package except cli; nothing but jobs/ and cli imports it."""
