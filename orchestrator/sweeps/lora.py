"""LoRA rank x MNIST variant (the EfficientAttention experiment): fine-tune a ViT trained on plain MNIST
on quantized, rotated and inverted MNIST with LoRA adapters of rank 1..64, against full fine-tuning.
Each variant is its own comparison group: ranks compete within a variant, never across."""

from ray import tune

from orchestrator.spec import Profile, SweepSpec

SPACE = {
    "data": {"variant": tune.grid_search(["quantized", "rotated", "inverted"])},
    "lora": tune.grid_search([{"mode": "full"}] + [{"mode": "lora", "rank": r} for r in (1, 4, 16, 64)]),
}

SWEEP = SweepSpec(
    name="lora",
    description=__doc__,
    workload="lora",
    group_by=("data.variant",),
    baseline={"lora": {"mode": "full"}},
    smoke=Profile(seeds=(0,), shows="tests the machinery", space={
        "data": {"variant": tune.grid_search(["inverted"])},
        "lora": tune.grid_search([{"mode": "full"}, {"mode": "lora", "rank": 2}])}),
    cpu=Profile(space=SPACE, seeds=(0, 1), shows="the workload's default ViT: 500 base steps on plain MNIST, "
                                                  "300 fine-tuning steps per variant"),
    gpu=Profile(space=SPACE, seeds=(0, 1, 2), shows="as on the CPU, with 3 seeds"),
)
