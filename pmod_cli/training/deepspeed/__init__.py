"""The DeepSpeed configs recipes name as train.deepspeed = "zero2" / "zero3" (a package so wheels ship them)."""
