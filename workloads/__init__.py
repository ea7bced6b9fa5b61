"""Training tasks for attnlab, each runnable alone (`python -m workloads.<name> --smoke`) and by the
orchestrator through `workloads.contract`, the one interface it sees (`contract.get(name)`)."""
