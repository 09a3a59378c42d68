"""The one exception type users see: every bad input becomes a CsmError with a message that
names the problem and the fix. The CLIs print it as one line and exit non-zero."""


class CsmError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class CheckpointError(CsmError):
    """A checkpoint that is missing, corrupt, truncated, or does not match the config."""


def read_json(path, what: str):
    """Parse a JSON file, turning a missing or malformed one into a CsmError naming `what`."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CsmError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CsmError(f"{what} {path} is not valid JSON ({exc})") from None
