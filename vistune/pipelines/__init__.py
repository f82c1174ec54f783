"""diffusers pipelines that need more than an attached tuner: control images (CSC) and dense prediction (HST).

Each pipeline lives in its own module and is re-exported here; the folders under the repository's ``pipelines/``
are thin ``custom_pipeline=`` entry points that import these classes.
"""

from typing import Any


def forget_other_pipelines(namespace: dict[str, Any]) -> None:
    """Drop pipeline classes that another ``custom_pipeline`` folder left in ``namespace``.

    diffusers executes every local folder's ``pipeline.py`` into one cached module
    (``diffusers_modules.local.pipeline``), so after loading two folders in one process it would find two pipeline
    classes there and refuse both. Each ``pipelines/<name>/pipeline.py`` calls this before its own import.
    """
    from diffusers import DiffusionPipeline

    for name, value in list(namespace.items()):
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value is not DiffusionPipeline:
            del namespace[name]


from .csc_control import CSCControlModel, ControlInputError, StableDiffusionCSCControlPipeline
from .hst_dense import HSTDenseModel, HSTDensePipeline

__all__ = ["CSCControlModel", "ControlInputError", "forget_other_pipelines", "HSTDenseModel", "HSTDensePipeline", "StableDiffusionCSCControlPipeline"]
