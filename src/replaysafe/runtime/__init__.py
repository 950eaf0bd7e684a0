"""The consumer runtime: the fixed pipeline per guarantee around user handlers."""

from replaysafe.runtime.worker import Worker

__all__ = ["Worker"]
