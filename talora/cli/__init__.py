"""The `talora` command (`main`) and what every job script shares: storage flags, actor-layout flags
and error handling that never leaks a credential (`common`).

The top floor: may import any talora package; nothing imports it."""
