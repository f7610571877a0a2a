"""What turns a task into LoRA weights: the text-conditioned hypernetwork (`hypernet`) and the
per-task static LoRA baseline (`static`).

May import talora.core and talora.config; knows nothing of SAM families."""
