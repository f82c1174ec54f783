"""Every notebook in examples/ runs headless, top to bottom, on the shipped models."""

import re
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if path.name == "01_quickstart.ipynb":
        assert "identical right after attach: True" in text
        assert "reloaded tuner reproduces the images: True" in text
        assert "detach restores the base images: True" in text
    if path.name == "02_csc_control.ipynb":
        assert "identical to the uncontrolled model at init: True" in text
        assert "reloaded pipeline reproduces the images: True" in text
        assert "weight 0 gives the uncontrolled images: True" in text
        ratio = float(re.search(r"CSC-Tuner +: [\d,]+ parameters = ([\d.]+)x ControlNet", text).group(1))
        assert 0 < ratio < 0.5
    if path.name == "03_hst_dense.ipynb":
        before = float(re.search(r"mIoU before training: ([\d.]+)", text).group(1))
        after = float(re.search(r"mIoU after training: ([\d.]+)", text).group(1))
        assert after > before + 0.1
        for line in ("frozen ViT weights unchanged: True", "reloaded pipeline reproduces the masks: True",
                     "pipeline masks equal the trained model's: True", "scale 0 gives the frozen ViT's outputs: True",
                     "detach restores the ViT's outputs: True"):
            assert line in text
    if path.name == "04_adapters_mosa_pear.ipynb":
        assert "identical features right after attach: True" in text
        assert "merged outputs equal the unmerged ones: True" in text
        assert text.count("reloaded reproduces the outputs: True") == 2
        merged, plain = re.search(r"merged: ([\d,]+) \(a plain adapter: ([\d,]+)\)", text).groups()
        assert merged == plain
        pear = float(re.search(r"\| pear 0.5 \| [\d,]+ \| ([\d.]+)x \|", text).group(1))
        assert pear <= 0.55
    if path.name == "05_watermark.ipynb":
        assert "identical images right after attach: True" in text
        assert "reloaded tuner reproduces the images: True" in text
        assert "merged VAE reproduces the images: True" in text
        first, last = (float(x) for x in re.findall(r"10 steps: bit accuracy ([\d.]+)", text))
        assert last > first
