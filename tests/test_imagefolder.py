"""CaptionedImageFolder: the imagefolder layout export_imagefolder writes, and every kind of bad input."""

import json

import pytest
import torch

from vistune.data import export_imagefolder
from vistune.data.imagefolder import CaptionedImageFolder


@pytest.fixture
def folder(tmp_path):
    return export_imagefolder(tmp_path / "data", 4, size=32, style="striped", save_masks=True)


def rewrite_metadata(images, keep):
    lines = (images / "metadata.jsonl").read_text().splitlines()
    (images / "metadata.jsonl").write_text("".join(line + "\n" for line in lines[:keep]))
    return [json.loads(line) for line in lines]


def test_reads_exported_folder(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    data = CaptionedImageFolder(folder, resolution=16)
    assert len(data) == 4 and data.captions == [r["text"] for r in rows]
    item = data[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert 0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["caption"] == rows[0]["text"]
    # from the export root, the masks the rows name are not taken for training images
    assert [p.name for p in CaptionedImageFolder(folder.parent, 32).files] == [p.name for p in data.files]


def test_missing_captions_warn_with_count(folder):
    rewrite_metadata(folder, keep=3)
    with pytest.warns(UserWarning, match="1 of 4 readable image.*empty caption"):
        data = CaptionedImageFolder(folder, 32)
    assert len(data) == 4 and data.captions[3] == "" and data.num_missing_captions == 1
    with pytest.warns(UserWarning, match="left out"):
        assert len(CaptionedImageFolder(folder, 32, missing_captions="skip")) == 3
    with pytest.raises(ValueError, match="1 image.*no 'text' caption"):
        CaptionedImageFolder(folder, 32, missing_captions="error")


def test_unreadable_images_are_skipped_and_counted(folder):
    (folder / "000001.png").write_bytes(b"not a png")
    with open(folder / "metadata.jsonl", "a") as meta:
        meta.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = CaptionedImageFolder(folder, 32)
    assert len(data) == 3
    assert sorted(p.name for p, _ in data.unreadable) == ["000001.png", "gone.png"]


def test_errors_name_the_problem(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionedImageFolder(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no usable training image: no image files"):
        CaptionedImageFolder(tmp_path / "empty", 32)
    with open(folder / "metadata.jsonl", "a") as meta:
        meta.write("{broken\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 5: not valid JSON"):
        CaptionedImageFolder(folder, 32)


def test_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="1 candidate image file.*none usable"):
        CaptionedImageFolder(tmp_path, 32)
