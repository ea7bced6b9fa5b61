from workloads.common.cli import main
from workloads.mqar import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("mqar", DEFAULTS, SMOKE, train_fn_per_worker)
