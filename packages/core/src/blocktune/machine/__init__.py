"""The machine blocktune runs on: its compute devices and its host memory."""
