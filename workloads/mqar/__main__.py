from workloads.common.cli import main
from workloads.mqar import WORKLOAD

if __name__ == "__main__":
    main(WORKLOAD)
