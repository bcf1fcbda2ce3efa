"""Logging set-up: rank 0 speaks at INFO, other ranks only at WARNING, so N processes print once."""
from __future__ import annotations

import logging
import os
import warnings


def rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for a CLI run; quiet third-party chatter we cannot act on."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank() != 0:
        level = logging.WARNING
    fmt = "%(message)s" if rank() == 0 and not verbose else "[%(asctime)s r%(rank)s %(name)s] %(message)s"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter())
    handler._vla_ds = True  # replace only our own handler on repeated calls (tests call main() often)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_vla_ds", False)] + [handler]
    # -v is vla-ds's own debug output: a DEBUG root would also let every library speak (matplotlib
    # alone logs one line per font it scores when a chart is drawn).
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("vla_ds").setLevel(level)
    for noisy in ("transformers", "deepspeed", "DeepSpeed", "torch.distributed", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # bitsandbytes warns at import that an optional CPU 4-bit kernel package is absent; we never use it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # Weight-loading progress bars for a tiny model are noise in every log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    quiet_deepspeed_accelerator()


def quiet_deepspeed_accelerator() -> None:
    """Tell DeepSpeed up front that a machine without CUDA uses its CPU accelerator.

    Otherwise every import of deepspeed (transformers and peft import it too) warns that it is
    "Setting accelerator to CPU". A user's explicit DS_ACCELERATOR always wins.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return True
