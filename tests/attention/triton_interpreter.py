"""What the Triton kernel tests share: kernels run on the CPU under TRITON_INTERPRET=1, outputs start as
NaN, errors are relative L2 against float64. Import this module before torch and triton: the variable
must be set before triton is imported in the process."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# relative L2 error allowed against float64, per input dtype: (outputs, gradients)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 5e-3)}


def skip_unless_interpreted(jit_function) -> None:
    """Skip the calling module when triton was imported earlier in this process without the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1" or type(jit_function).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)


_empty = torch.empty


def _poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """torch.empty that fills its memory with NaN (floats) or -1 (integers) instead of whatever it held."""
    out = _empty(*args, **kwargs)
    return out.fill_(float("nan") if out.is_floating_point() else -1) if out.numel() else out


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer made by torch.empty starts as NaN (or -1): an output element a kernel skips fails
    the comparison instead of passing on what the memory held (the kernels allocate with torch.empty)."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (an unwritten output stays NaN)"
    return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def assert_backends_agree(method: str, knobs: dict, x: torch.Tensor, out_rtol: float = 0.0, **inputs) -> None:
    """The method's mixer on its Triton kernel and on its PyTorch path, same weights, same inputs: outputs
    and every parameter's gradient agree (float32 tolerances)."""
    import attention

    mixer = attention.build(attention.make_config(method, backend="triton", **knobs), x.shape[-1])
    reference = attention.build(attention.make_config(method, backend="reference", **knobs), x.shape[-1])
    reference.load_state_dict(mixer.state_dict())
    y, y_ref = mixer(x, **inputs), reference(x, **inputs)
    torch.testing.assert_close(y, y_ref, rtol=out_rtol, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(mixer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)
