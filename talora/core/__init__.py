"""The building blocks of every task model: LoRA layers and adapters (`lora`) and the frozen sentence
encoder that turns a prompt into an embedding (`text`); which low-precision dtypes a CPU computes
in hardware (`precision`).

May import talora.io only; knows nothing of SAM."""
