"""User-facing errors: one line naming the problem and the fix, exit code 2."""


class UsageError(Exception):
    """Bad input from the user. The CLI prints `error: <message>` and exits with code 2."""


def brief(error: BaseException, limit: int = 160) -> str:
    """An exception's type and message squeezed onto one short line, for the '(why)' of a UsageError."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:  # torch.load(weights_only=True): the cause, not the preamble
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
