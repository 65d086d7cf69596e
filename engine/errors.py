"""Errors the engine raises for things a user can fix: one readable line plus a hint.

Messages and hints name the engine's own parameters (`cpu_mem_gib`, `percents`, ...), never a
command-line flag: a caller that has flags (jobrunner.cli) maps the structured fields to them.
"""
from __future__ import annotations

from collections.abc import Mapping

# Each memory budget by the name of the Engine / planner parameter that sets it (GiB).
BUDGET_PARAMETERS = {"gpu": "gpu_mem_gib", "cpu": "cpu_mem_gib", "disk": "disk_mem_gib"}


class EngineInputError(ValueError):
    """Bad input to the engine: a model directory, a policy, a budget, a prompt. `parameter` names
    the engine parameter the problem is about, when there is one."""

    hint: str = ""
    parameter: str | None = None

    def __init__(self, message: str, hint: str = "", *, parameter: str | None = None) -> None:
        super().__init__(message)
        if hint:
            self.hint = hint
        if parameter:
            self.parameter = parameter


class ModelConfigError(EngineInputError):
    hint = ("point the model path at a Hugging Face OPT, Llama, Mistral or Qwen2 directory, or create one "
            "with `flexjob make-model`")
    parameter = "model_dir"


class CheckpointError(EngineInputError):
    hint = "the checkpoint files look damaged: re-download or re-create the model directory"
    parameter = "model_dir"


class PolicyError(EngineInputError):
    hint = "check the policy's percents and batch sizes, or let the planner choose a policy"
    parameter = "policy"


class PromptTooLongError(EngineInputError):
    hint = "shorten the prompt, lower max_new_tokens, or cut the prompt to fit"
    parameter = "max_new_tokens"


class BudgetError(EngineInputError):
    """Something needs more memory than a budget allows. Structured: `tier` ("gpu", "cpu", "disk")
    with `needed_gib` and `allowed_gib` when one budget is exceeded; `smallest_gib` (per tier, with
    the other budgets as given) when a planner found no policy at all. `describe` words it with the
    caller's names for the budgets; `str()` uses the engine's parameter names."""

    hint = "raise the memory budget, move more weights or cache to disk, or use a smaller block"

    def __init__(self, subject: str, *, tier: str | None = None, needed_gib: float | None = None,
                 allowed_gib: float | None = None, smallest_gib: Mapping[str, float] | None = None,
                 otherwise: str = "") -> None:
        self.subject, self.tier, self.needed_gib, self.allowed_gib = subject, tier, needed_gib, allowed_gib
        self.smallest_gib = dict(smallest_gib or {})
        self.otherwise = otherwise
        super().__init__(self.describe(BUDGET_PARAMETERS),
                         parameter=BUDGET_PARAMETERS[tier] if tier else None)

    def describe(self, budget_names: Mapping[str, str]) -> str:
        """The message, naming each budget as `budget_names[tier]` says (e.g. a flag)."""
        if self.tier is not None:
            return f"{self.subject}, but {budget_names[self.tier]} allows {self.allowed_gib:g} GiB"
        if self.smallest_gib:
            options = " or ".join(f"{budget_names[t]} {v:.2f}" for t, v in self.smallest_gib.items())
            return f"{self.subject}; the smallest budget that works: {options} (with the other budgets as given)"
        return f"{self.subject}{self.otherwise}"
