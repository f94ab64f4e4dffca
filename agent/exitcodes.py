"""Process exit codes of every ``chutes-attest`` command (documented in ``--help`` and the README)."""

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (network, hardware, validator refusal, ...)
EXIT_USAGE = 2  # usage or configuration error
EXIT_VERIFY_FAILED = 3  # evidence parsed but a check did not pass
EXIT_BAD_INPUT = 4  # malformed input (a quote, nonce or file that does not parse)
EXIT_UNAVAILABLE = 5  # a required device or source is unavailable
EXIT_INTERRUPTED = 130
