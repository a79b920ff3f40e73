"""Launching QEMU, talking QMP to it, and migration parameters and statistics."""
