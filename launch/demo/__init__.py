"""The embedded demo: a small T5 trained to add two-digit numbers."""
