"""Which module holds a model's math: one module of pure functions per architecture family
(engine.model.opt, engine.model.llama), chosen by the model's config type. Both modules offer the
same functions with the same signatures, so the schedule runs either."""
from __future__ import annotations

from types import ModuleType

from engine.model import llama, opt
from engine.model.config import ModelConfig
from engine.model.llama_config import LlamaConfig


def family_math(cfg: ModelConfig) -> ModuleType:
    return llama if isinstance(cfg, LlamaConfig) else opt
