"""The automatic-mask-generation helpers every family's post-processing uses: a point grid, batched
mask data, stability scores and mask boxes.

They are family-agnostic tensor code, taken from segment_anything's ``utils/amg.py`` (sam2 ships the
same functions as ``sam2.utils.amg``); the predictor imports them from here, so it depends on the
backbone seam and not on one family's package.
"""

from segment_anything.utils.amg import MaskData, batched_mask_to_box, build_point_grid, calculate_stability_score

__all__ = ["MaskData", "batched_mask_to_box", "build_point_grid", "calculate_stability_score"]
