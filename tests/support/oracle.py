"""The independent oracle: Hugging Face's own class for the model (OPTForCausalLM, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM: config.json's `architectures`) on the same weights, one
prompt at a time."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@lru_cache(maxsize=None)
def hf_greedy(model_dir: str, prompt_ids: tuple[int, ...], max_new_tokens: int,
              eos_token_id: int | None = None) -> tuple[int, ...]:
    """Greedy continuation of one unpadded prompt (stops at eos_token_id when given)."""
    model = hf_model(str(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id if eos_token_id is not None else -1,
                             pad_token_id=1, min_new_tokens=0)
    return tuple(out[0, len(prompt_ids):].tolist())


def model_path(p: Path | str) -> str:
    return str(Path(p).resolve())
