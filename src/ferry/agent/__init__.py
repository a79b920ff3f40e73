"""The host agent: owns the QEMU processes on one host and serves the controller."""
