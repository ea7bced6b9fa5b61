"""LoRA rank x MNIST variant (the EfficientAttention experiment): fine-tune a ViT trained on plain MNIST
on quantized, rotated and inverted MNIST with LoRA adapters of rank 1..64, against full fine-tuning."""

from ray import tune

from orchestrator.spec import SweepSpec

SWEEP = SweepSpec(
    name="lora",
    description=__doc__,
    workload="lora",
    space={
        "data": {"variant": tune.grid_search(["quantized", "rotated", "inverted"])},
        "lora": tune.grid_search([{"mode": "full"}] + [{"mode": "lora", "rank": r} for r in (1, 4, 16, 64)]),
    },
    smoke_space={
        "data": {"variant": tune.grid_search(["inverted"])},
        "lora": tune.grid_search([{"mode": "full"}, {"mode": "lora", "rank": 2}]),
    },
)
