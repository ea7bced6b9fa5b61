from workloads.common.cli import main
from workloads.speed import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("speed", DEFAULTS, SMOKE, train_fn_per_worker)
