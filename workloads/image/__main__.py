from workloads.common.cli import main
from workloads.image import WORKLOAD

if __name__ == "__main__":
    main(WORKLOAD)
