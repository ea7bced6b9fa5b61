"""Training tasks for attnlab, each runnable alone (`python -m workloads.<name> --smoke`) and inside a
Ray Train worker through `workloads.<name>.train_fn_per_worker(config)`."""

WORKLOADS = ("lm", "mqar", "image", "lora", "completion", "speed", "distill")
