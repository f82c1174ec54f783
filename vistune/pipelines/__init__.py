"""diffusers pipelines that need more than an attached tuner: control images (CSC) and dense prediction (HST).

Each pipeline lives in its own module and is re-exported here; the folders under the repository's ``pipelines/``
are thin ``custom_pipeline=`` entry points that import these classes.
"""

from .csc_control import CSCControlModel, ControlInputError, StableDiffusionCSCControlPipeline
from .hst_dense import HSTDenseModel, HSTDensePipeline

__all__ = ["CSCControlModel", "ControlInputError", "HSTDenseModel", "HSTDensePipeline", "StableDiffusionCSCControlPipeline"]
