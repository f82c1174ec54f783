"""Community-pipeline entry point for HST dense prediction; the code lives in ``vistune.pipelines.hst_dense``.

    DiffusionPipeline.from_pretrained("hst-seg-pipeline", custom_pipeline="pipelines/hst_dense", trust_remote_code=True)
"""

from vistune.pipelines import forget_other_pipelines

forget_other_pipelines(globals())  # what a previously loaded custom_pipeline folder left in this cached module

from vistune.pipelines.hst_dense import HSTDenseModel, HSTDenseOutput, HSTDensePipeline  # noqa: F401
