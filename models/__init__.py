"""Model families (what differs between SD1.5, SDXL, SD3 and Flux), loading of the trained
components, LoRA, pipelines and image generation."""
