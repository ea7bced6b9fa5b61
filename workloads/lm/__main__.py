from workloads.common.cli import main
from workloads.lm import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("lm", DEFAULTS, SMOKE, train_fn_per_worker)
