"""Where block tasks run: the per-process convolver cache, the device each
worker picks for ``backend='auto'``, and what the pipeline asks of the
scheduler (threads, GPU workers, placement)."""
