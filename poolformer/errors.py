"""Errors the library raises for bad input. Each carries a one-line message meant for a user and the exit
code a command-line front end should use (2: the request itself is wrong; 1: the request was fine but
something it names could not be used)."""


class PoolformerError(Exception):
    """Base class: a problem a user can fix, described in one line."""

    exit_code = 1


class UnknownModelError(PoolformerError, KeyError):
    exit_code = 2

    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean: {', '.join(suggestions)}?" if suggestions else "; see `poolformer list`"
        super().__init__(f"unknown model {name!r}{hint}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class ConfigError(PoolformerError, ValueError):
    """An option or override that no model can be built or run with."""

    exit_code = 2


class CheckpointError(PoolformerError):
    """A checkpoint file that cannot be read, is unsafe, or does not fit the model."""


class WeightsUnavailableError(PoolformerError):
    """Published weights that could not be downloaded (offline, or the source is gone)."""
