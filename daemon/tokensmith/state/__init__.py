"""Per-client state backends. The file backend (state/file.py) is the default."""

from tokensmith.state.file import ClientState, StateStore, check_types  # noqa: F401
