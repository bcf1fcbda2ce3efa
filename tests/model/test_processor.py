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


def assert_stock_processor_files(model_dir):
    """`model_dir`'s processor files name the stock classes, as the published Qwen2.5-VL's do, and
    AutoProcessor gives the full processor or fails loudly: never a tokenizer that drops the images."""
    import json

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import BaseVideoProcessor

    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert pre["processor_class"] == tok["processor_class"] == "Qwen2_5_VLProcessor"
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert not (model_dir / "processor_config.json").exists()
    assert not any("ImageOnly" in f.read_text() for f in model_dir.glob("*.json"))
    # the video half finds its settings (as for the published model: preprocessor_config.json)
    assert BaseVideoProcessor.get_video_processor_dict(str(model_dir))[0]["patch_size"] == pre["patch_size"]
    ours = load_processor(model_dir)
    assert isinstance(ours, ImageOnlyQwenVLProcessor)
    if is_torchvision_available():
        stock = AutoProcessor.from_pretrained(model_dir)
        assert isinstance(stock, Qwen2_5_VLProcessor)
        text = ours.apply_chat_template(chat_message(1, "x"), tokenize=False)
        a = stock(text=[text], images=[synthetic_view(0)], return_tensors="pt")
        b = ours(text=[text], images=[synthetic_view(0)], return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    else:
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            AutoProcessor.from_pretrained(model_dir)


def test_the_tiny_model_holds_the_stock_processor_files(tiny_model_dir):
    assert_stock_processor_files(tiny_model_dir)


def test_an_old_directory_naming_vla_ds_class_is_rewritten_stock(tiny_model_dir, tmp_path):
    # what vla-ds wrote before: processor_config.json naming ImageOnlyQwenVLProcessor
    from vla_ds.model.processor import save_processor

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    (old / "processor_config.json").write_text('{"processor_class": "ImageOnlyQwenVLProcessor"}')
    save_processor(load_processor(old), tmp_path / "new")
    shutil.copy2(old / "config.json", tmp_path / "new" / "config.json")
    assert_stock_processor_files(tmp_path / "new")


def test_a_decoded_uint8_image_gives_the_processor_inputs_of_its_pil_image(tiny_model_dir):
    # the data loader hands decoded (H, W, 3) uint8 tensors (they cross from workers by shared memory)
    import numpy as np
    import torch

    from vla_ds.data.synthetic import synthetic_view
    from vla_ds.model.backbone import load_image
    from vla_ds.model.processor import load_processor

    processor = load_processor(tiny_model_dir)
    pil = synthetic_view(3).convert("RGB")
    tensor = torch.from_numpy(np.array(pil))
    a = processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"]
    b = processor.image_processor(images=[load_image(tensor)], return_tensors="pt")["pixel_values"]
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8 RGB"):
        load_image(tensor.float())
