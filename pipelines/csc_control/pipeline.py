"""Community-pipeline entry point for CSC-Tuner control (SCEdit).

    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/csc_control", trust_remote_code=True)

The pipeline lives in ``vistune.pipelines.csc_control``; this file only re-exports it (diffusers picks the one
``DiffusionPipeline`` subclass here that is not defined inside diffusers).
"""

from vistune.pipelines import forget_other_pipelines

forget_other_pipelines(globals())  # what a previously loaded custom_pipeline folder left in this cached module

from vistune.pipelines.csc_control import CSCControlModel, StableDiffusionCSCControlPipeline

__all__ = ["CSCControlModel", "StableDiffusionCSCControlPipeline"]
