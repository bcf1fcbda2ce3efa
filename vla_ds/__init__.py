"""vla-ds: train QwenVLA (Qwen2.5-VL + sensor encoder + action expert) with DeepSpeed."""

__version__ = "0.1.0"
