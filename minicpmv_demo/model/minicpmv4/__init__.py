"""MiniCPM-V 4.x (4.6, 4.7): transformers' own model classes, run by `MiniCPMV4Runner`."""
