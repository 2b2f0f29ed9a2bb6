"""Model families (what differs between SD1.5 and SDXL) and loading of the trained components."""

from models.family import ModelFamily, family_for
from models.loading import Components, load_components
from models.pipeline import load_pipeline

__all__ = ["Components", "ModelFamily", "family_for", "load_components", "load_pipeline"]
