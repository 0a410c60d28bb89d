"""minicpmv-demo: a Gradio demo for MiniCPM-V that batches concurrent users on one engine thread."""
