from workloads.common.cli import main
from workloads.image import DEFAULTS, SMOKE, train_fn_per_worker

if __name__ == "__main__":
    main("image", DEFAULTS, SMOKE, train_fn_per_worker)
