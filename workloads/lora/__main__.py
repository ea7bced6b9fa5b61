from workloads.common.cli import main
from workloads.lora import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("lora", DEFAULTS, SMOKE, train_fn_per_worker)
