"""The one exception type users see: every bad input becomes a CsmError with a message that
names the problem and the fix. The CLIs print it as one line and exit non-zero."""


class CsmError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class CheckpointError(CsmError):
    """A checkpoint that is missing, corrupt, truncated, or does not match the config."""
