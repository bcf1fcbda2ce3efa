"""The tiny Qwen2.5-VL directory: complete, loadable by the stock classes, deterministic."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vla_ds.data.synthetic import synthetic_view
from vla_ds.model.backbone import chat_message
from vla_ds.model.processor import ImageOnlyQwenVLProcessor, load_processor, save_processor
from vla_ds.model.tiny import QWEN_SPECIAL_TOKENS, TinySpec, build_config, build_tokenizer, write_tiny_model


def _inputs(processor, images, instruction="Insert the needle."):
    text = processor.apply_chat_template(chat_message(len(images), instruction), tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=images, return_tensors="pt")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_is_complete(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["text_config"]["hidden_size"] == 64 and cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["vision_config"]["depth"] == 2


def test_the_processor_keeps_the_image_processor(tiny_model_dir):
    # (AutoProcessor on the same directory: tests/model/test_processor.py)
    processor = load_processor(tiny_model_dir)
    assert isinstance(processor, ImageOnlyQwenVLProcessor)
    inputs = _inputs(processor, [synthetic_view(0), synthetic_view(1)])
    merge = processor.image_processor.merge_size ** 2
    expected_tokens = int((inputs["image_grid_thw"].prod(-1) // merge).sum())
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].shape == (2, 3)
    assert int((inputs["input_ids"] == image_id).sum()) == expected_tokens > 0


def test_token_ids_agree_between_tokenizer_and_config(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    config = Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    for name, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(config, name) == tok.convert_tokens_to_ids(token), name
    for token in QWEN_SPECIAL_TOKENS:  # each special token is one id, never split
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    assert config.text_config.vocab_size >= len(tok)
    text = processor.apply_chat_template(chat_message(2, "go"), tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_two_image_forward_uses_the_images(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    a = _inputs(processor, [synthetic_view(0), synthetic_view(1)])
    b = _inputs(processor, [synthetic_view(0), synthetic_view(7)])
    with torch.no_grad():
        ha = model(**a, output_hidden_states=True).hidden_states[-1]
        hb = model(**b, output_hidden_states=True).hidden_states[-1]
    assert ha.shape == (1, a["input_ids"].shape[1], 64)
    assert torch.isfinite(ha).all()
    assert not torch.allclose(ha, hb), "changing the second view must change the features"


def test_save_load_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    processor = load_processor(tiny_model_dir)
    inputs = _inputs(processor, [synthetic_view(3), synthetic_view(4)])
    # The weights on disk are exactly the seeded initialisation ...
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = Qwen2_5_VLForConditionalGeneration(build_config(TinySpec(), build_tokenizer())).eval()
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    # ... and a save -> load cycle of the loaded model changes nothing.
    loaded.save_pretrained(tmp_path / "again")
    save_processor(processor, tmp_path / "again")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        logits = [m(**inputs).logits for m in (fresh, loaded, reloaded)]
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[1], logits[2])
    assert isinstance(load_processor(tmp_path / "again"), ImageOnlyQwenVLProcessor)


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = write_tiny_model(tmp_path / "a", seed=5)
    b = write_tiny_model(tmp_path / "b", seed=5)
    c = write_tiny_model(tmp_path / "c", seed=6)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(a / name) == _sha(b / name), name
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(c / "tokenizer.json")


def test_writing_over_an_existing_model_replaces_it_whole(tmp_path):
    out = write_tiny_model(tmp_path / "m", seed=1)
    (out / "stale.txt").write_text("left from an older write")
    write_tiny_model(out, seed=2)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no temporary directories left behind"


def test_published_config_keeps_its_architecture_with_the_offline_tokenizer(tmp_path):
    """`config_json` (the GPU benchmark's 3B path), on a shrunken copy of the published 3B config:
    its sizes and vocabulary come through unchanged, its special ids become the tokenizer's, and the
    directory loads and runs with the stock classes."""
    from vla_ds.profiling.plan import DEFAULT_BACKBONE

    published = json.loads(open(DEFAULT_BACKBONE).read())
    small = dict(published, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    small["vision_config"] = dict(published["vision_config"], depth=2, hidden_size=32, intermediate_size=48,
                                  num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1])
    (tmp_path / "config.json").write_text(json.dumps(small))
    out = write_tiny_model(tmp_path / "m", config_json=tmp_path / "config.json", dtype=torch.bfloat16)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    text = model.config.text_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (151936, 64, 96)
    assert model.config.vision_config.window_size == published["vision_config"]["window_size"]
    processor = load_processor(out)
    tok = processor.tokenizer
    assert text.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>") != published["bos_token_id"]
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        hidden = model(**_inputs(processor, [synthetic_view(0)]), output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[-1] == 64 and torch.isfinite(hidden.float()).all()


def test_spec_validation():
    with pytest.raises(ValueError, match="even heads"):
        TinySpec(hidden_size=60, num_heads=8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TinySpec(num_heads=4, num_kv_heads=3)


@pytest.mark.gpu
def test_forward_on_gpu_in_bf16(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    inputs = _inputs(processor, [synthetic_view(0), synthetic_view(1)]).to("cuda")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()
