"""talora: text-to-LoRA for Segment Anything.

Data flows one way: text -> hypernet -> adapter -> SAM (encoder tail + mask decoder) -> masks.
"""

__version__ = "0.1.0"
