"""The project's one exception family: errors a user can act on, printed as one line."""


class FedHubertError(Exception):
    """Base class. Top-level scripts print ``error: <message>`` and exit with status 2."""


class ConfigError(FedHubertError):
    """A config file, key or value is wrong; the message names the key or the file."""


class DataError(FedHubertError):
    """Input data is missing or unusable; the message names the path."""


class FederationError(FedHubertError):
    """A federated run cannot go on (too few clients succeeded, no checkpoint to resume from, ...)."""


class TrainingError(FedHubertError):
    """Local training cannot go on (e.g. the loss became NaN/Inf); the message names the step."""


class OutputError(FedHubertError):
    """An output could not be written (a full disk, no permission); the message names the file, and the
    earlier file of that name, if any, is left as it was (fileio.atomic_path)."""
