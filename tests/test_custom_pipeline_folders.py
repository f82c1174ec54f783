"""The pipelines/<name>/pipeline.py folders load one after another in one process, as diffusers loads them."""

import types
from pathlib import Path

from diffusers.utils.dynamic_modules_utils import find_pipeline_class

from vistune.pipelines import HSTDensePipeline, StableDiffusionCSCControlPipeline

ROOT = Path(__file__).resolve().parents[1] / "pipelines"


def test_each_folder_finds_only_its_own_pipeline_in_the_shared_cached_module():
    # diffusers executes every local folder's pipeline.py into one module, diffusers_modules.local.pipeline
    module = types.ModuleType("diffusers_modules.local.pipeline")
    for folder, expected in [("csc_control", StableDiffusionCSCControlPipeline), ("hst_dense", HSTDensePipeline),
                             ("csc_control", StableDiffusionCSCControlPipeline)]:
        path = ROOT / folder / "pipeline.py"
        exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
        assert find_pipeline_class(module) is expected
