"""The engine's errors in the CLI's words: budgets and parameters named by the flags that set them.

The engine names its own parameters (`cpu_mem_gib`, `percents`, ...); a user of `flexjob` sets them
with flags, so the messages and hints shown on the command line say `--cpu-mem`, `--percent`, ...
"""
from __future__ import annotations

from engine.errors import (BudgetError, EngineInputError, ModelConfigError, PolicyError,
                           PromptTooLongError)

BUDGET_FLAGS = {"gpu": "--gpu-mem", "cpu": "--cpu-mem", "disk": "--disk-mem"}

# Hints by error kind, for errors whose engine hint speaks of parameters rather than flags.
FLAG_HINTS: dict[type, str] = {
    ModelConfigError: "point --model at a Hugging Face OPT, Llama, Mistral or Qwen2 directory, or create one "
                      "with `flexjob make-model`",
    PolicyError: "see `flexjob generate --help` for the policy flags, or omit --percent to let the planner choose",
    PromptTooLongError: "shorten the prompt, lower --max-new-tokens, or pass --max-input-length to cut it",
}
# Hints by the engine parameter an error is about.
PARAMETER_HINTS = {"hardware_profile": "write one with `flexjob profile --json > FILE`"}


def cli_message(exc: EngineInputError) -> tuple[str, str]:
    """(message, hint) for the command line."""
    if isinstance(exc, BudgetError):
        flags = " or ".join(BUDGET_FLAGS[t] for t in ([exc.tier] if exc.tier else exc.smallest_gib) if t)
        hint = (f"raise {flags or '--gpu-mem/--cpu-mem'}, move more weights or cache to disk, "
                "or use a smaller block")
        return exc.describe(BUDGET_FLAGS), hint
    if exc.parameter in PARAMETER_HINTS:
        return str(exc), PARAMETER_HINTS[exc.parameter]
    for kind, hint in FLAG_HINTS.items():
        if isinstance(exc, kind):
            return str(exc), hint
    return str(exc), exc.hint
