"""diffusers pipelines that need more than an attached tuner: control images, dense prediction, watermark detection.

Each pipeline lives in its own module and is re-exported here; the folders under the repository's ``pipelines/``
are thin ``custom_pipeline=`` entry points that import these classes.
"""

from .csc_control import CSCControlModel, ControlInputError, StableDiffusionCSCControlPipeline

__all__ = ["CSCControlModel", "ControlInputError", "StableDiffusionCSCControlPipeline"]
