"""t5beam's model layer: the T5 network in Flax, decoding, scoring, checkpoints.

Importing it changes no process-wide setting; `model.runtime` holds the XLA
settings an entry point applies explicitly.
"""
