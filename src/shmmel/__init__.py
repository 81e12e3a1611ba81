"""shmmel: Whisper log-mel spectrograms behind an HTTP API, over POSIX shared memory."""

__version__ = "0.1.0"
