"""Names of the conditioning modes a family adapter implements, kept free of imports so the
config can offer them as choices without loading diffusers."""

# How SDXL's micro-conditioning time_ids are filled (models/family.py, SDXLFamily.time_ids):
# constant: (R, R, 0, 0, R, R) for every image, as the released Diffusion-DPO SDXL trainer did;
# original: the image's true (H, W) before resizing and its crop (top, left), then (R, R).
TIME_IDS_MODES = ("constant", "original")
# What a dropped caption conditions on (models/family.py, ModelFamily.empty_prompt).
EMPTY_PROMPT_MODES = ("encode", "zeros")
