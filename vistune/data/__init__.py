"""Data: the procedural shapes world (images, masks, boxes, edges, styles, clips), captioned image folders
and tokenizers."""

from vistune.data.shapes import (
    BACKGROUNDS,
    COLOR_NAMES,
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    STYLES,
    ColorSegmentation,
    ShapesClip,
    ShapesDataset,
    ShapesSample,
    ShapeSpec,
    all_pairs,
    collate_fn,
    export_imagefolder,
    held_out_prompts,
    instance_edges,
    make_caption,
    parse_caption,
    recolor_pastel,
    render_scene,
    sample_clip,
    sample_scene,
    segment_colors,
    shape_mask,
    shape_polygon,
    style_color,
    style_statistic,
    style_statistics,
    to_rgb_uint8,
)
from vistune.data.imagefolder import CaptionedImageFolder, load_rgb
from vistune.data.tokenizer import build_word_tokenizer, write_word_tokenizer

__all__ = [
    "BACKGROUNDS", "CaptionedImageFolder", "load_rgb", "COLOR_NAMES", "COLORS", "HELD_OUT_PAIRS", "SHAPES", "STYLES",
    "ColorSegmentation", "ShapesClip", "ShapesDataset", "ShapesSample", "ShapeSpec",
    "all_pairs", "collate_fn", "export_imagefolder", "held_out_prompts", "instance_edges",
    "make_caption", "parse_caption", "recolor_pastel", "render_scene", "sample_clip", "sample_scene",
    "segment_colors", "shape_mask", "shape_polygon", "style_color", "style_statistic",
    "style_statistics", "to_rgb_uint8", "build_word_tokenizer", "write_word_tokenizer",
]
