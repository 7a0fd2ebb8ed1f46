"""The one training loop and what keeps a run alive: the Trainer's iteration (loop), a run with its
folder, evaluations, metrics and resume (run), the typed training config (config), atomic
checkpoints (checkpoint), the divergence guard (guard), processes through accelerate (distributed)
and the evaluation EMA (ema)."""
