"""`load_processor`: resolution bounds and clear errors for incomplete directories."""
from __future__ import annotations

import shutil

import pytest

from vla_ds.data.synthetic import synthetic_view
from vla_ds.model.backbone import chat_message
from vla_ds.model.processor import ImageOnlyQwenVLProcessor, load_processor


def _image_tokens(processor, size=(240, 320)):
    text = processor.apply_chat_template(chat_message(1, "x"), tokenize=False)
    inputs = processor(text=[text], images=[synthetic_view(0, *size)], return_tensors="pt")
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def test_pixel_bounds_change_the_number_of_image_tokens(tiny_model_dir):
    small = load_processor(tiny_model_dir, min_pixels=28 * 28, max_pixels=56 * 56)
    default = load_processor(tiny_model_dir)
    large = load_processor(tiny_model_dir, max_pixels=224 * 224)
    assert isinstance(default, ImageOnlyQwenVLProcessor)
    counts = [_image_tokens(p) for p in (small, default, large)]
    assert counts[0] < counts[1] < counts[2]
    # 56x56 px at most -> at most (56/14)^2 / 4 = 4 merged tokens
    assert counts[0] <= 4


def test_directory_without_chat_template_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_processor(broken)
