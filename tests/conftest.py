"""Shared pytest setup: the repository root on sys.path, quiet TensorFlow."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The project's XLA settings, applied as every entry point applies them
# (before JAX starts); child processes of the tests inherit them.
from model import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.configure_xla_cpu()
