from workloads.common.cli import main
from workloads.completion import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("completion", DEFAULTS, SMOKE, train_fn_per_worker)
