"""Errors the engine raises for things a user can fix; the CLI prints them as one line plus a hint."""


class EngineInputError(ValueError):
    """Bad input to the engine: a model directory, a policy, a budget, a prompt."""

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class ModelConfigError(EngineInputError):
    hint = "point --model at a Hugging Face OPT directory, or create one with `flexjob make-model`"


class CheckpointError(EngineInputError):
    hint = "the checkpoint files look damaged: re-download or re-create the model directory"


class PolicyError(EngineInputError):
    hint = "see `flexjob generate --help` for the policy flags, or omit --percent to let the planner choose"


class BudgetError(EngineInputError):
    hint = "raise --gpu-mem/--cpu-mem, move more weights or cache to disk, or use a smaller block"


class PromptTooLongError(EngineInputError):
    hint = "shorten the prompt, lower --max-new-tokens, or pass --max-input-length to cut it"
