"""Ray Tune + Ray Train + MLflow orchestration of attnlab's ablation sweeps."""
