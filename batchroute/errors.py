"""The exception tree. Every class pickles, because errors cross Ray process boundaries.

    BatchrouteError              base of everything the job raises on purpose
    ├── ConfigError              the job file is wrong; raised before any work starts
    │   └── RunFolderLocked      another process is writing the run folder
    ├── SchemaError              input or labels do not match schemas/
    ├── RouterError              router file missing, corrupt, or incompatible with the job
    ├── DispatchError            a model call went wrong
    │   ├── TransientDispatchError   worth retrying: timeouts, 5xx, 429, dropped connections
    │   │   └── RateLimited          429, with the provider's Retry-After
    │   └── TerminalDispatchError    not worth retrying: other 4xx, bad payloads, bad keys
    │       ├── AuthError            401/403 or no key: stops calls to that model
    │       ├── Abandoned            not sent: the run that asked for it is gone
    │       └── InternalDispatchError   an unforeseen exception, recorded on the row
    ├── SinkError                results could not be committed
    └── Interrupted              SIGINT/SIGTERM: answered rows committed, then exit 130/143

A request's outcome is data (a result row with status, error type and message); dispatch
errors only travel inside the dispatcher and end as such rows, never as a crash of the job.
"""

from __future__ import annotations


class BatchrouteError(Exception):
    """Base class. Carries one human message; subclasses add no state, so pickling is plain."""

    exit_code = 3


class ConfigError(BatchrouteError):
    """The job configuration is invalid. The message names the offending key."""

    exit_code = 2


class SchemaError(BatchrouteError):
    """A table does not match its declared schema. The message names the file and column."""

    exit_code = 2


class RouterError(BatchrouteError):
    """The router file is missing, corrupt, or names models the job does not know."""

    exit_code = 2


class SinkError(BatchrouteError):
    """Results or the manifest could not be written."""


class DispatchError(BatchrouteError):
    """A model call failed. ``error_type`` is the short name written to the result row."""

    error_type = "dispatch_error"

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_dispatch_error,
                (type(self), str(self), self.status, self.retry_after_s))


def _rebuild_dispatch_error(cls: type[DispatchError], message: str, status: int | None,
                            retry_after_s: float | None) -> DispatchError:
    return cls(message, status=status, retry_after_s=retry_after_s)


class TransientDispatchError(DispatchError):
    """Retried with backoff: timeouts, connection drops, malformed bodies, 408/409/429/5xx."""

    error_type = "transient"


class RateLimited(TransientDispatchError):
    """HTTP 429. ``retry_after_s`` holds what the provider asked for, when it said."""

    error_type = "rate_limited"


class TerminalDispatchError(DispatchError):
    """Not retried: a 4xx other than 408/409/429, or a response that cannot be a success."""

    error_type = "terminal"


class InternalDispatchError(TerminalDispatchError):
    """An unforeseen exception while making or reading a call; recorded, not retried."""

    error_type = "internal"


class InvalidOutput(TerminalDispatchError):
    """An answer that is not one of the task's labels, or does not match its JSON schema,
    after every retry ([task.output] retries_on_invalid). The raw answer is kept."""

    error_type = "invalid_output"


class Abandoned(TerminalDispatchError):
    """A row a dispatch actor did not send because its driver is gone (killed, or lost):
    nobody would commit the answer."""

    error_type = "abandoned"


class Interrupted(BatchrouteError):
    """The run was stopped by a signal after committing what had been answered. The exit
    code is the shell's convention for that signal: 128 + its number (130, 143)."""

    def __init__(self, message: str, *, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self),), {"signum": self.signum})


class AuthError(TerminalDispatchError):
    """HTTP 401/403, or the key's environment variable is unset. Stops calls to that model."""

    error_type = "auth"
