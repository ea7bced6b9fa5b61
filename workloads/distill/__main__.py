from workloads.common.cli import main
from workloads.distill import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("distill", DEFAULTS, SMOKE, train_fn_per_worker)
