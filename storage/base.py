"""Temporary alias of broker.journal (the store port moved into the core); removed once cluster/ moved."""

from broker.journal import *  # noqa: F403
from broker.journal import Schedule  # noqa: F401
