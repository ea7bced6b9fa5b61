import dataclasses

from attention.backend import BACKENDS
from attention.config import (
    ConfigError,
    MethodConfig,
    check_acts,
    check_bool,
    check_choice,
    check_float,
    check_int,
)


@dataclasses.dataclass(frozen=True)
class Colt5Config(MethodConfig):
    """CoLT5 conditional computation (Ainslie et al. 2023): light branches on every token, heavy
    branches on the tokens a coordinate-descent router picks.

    Not causal: num_routed_q / num_routed_kv / num_routed_ff are tokens routed per sequence (per
    route block when route_block_size > 0, split evenly between the blocks).
    Causal: the sequence is cut into windows of heavy_window tokens; window_routed_q and
    window_routed_ff are the tokens routed per window (chosen without looking ahead, see README),
    num_routed_kv the past key/values each window's queries attend to; num_routed_q / num_routed_ff
    are not used. (A per-sequence count would make a window's routing depend on the sequence length.)
    heads / dim_head: defaults for heavy_heads and light_heads (0 = heads).
    light_window: window of the light local attention. num_kv_routing_tokens: kv routers, each
    serving heavy_heads / num_kv_routing_tokens heads. router_iters, router_eps, router_eps_init,
    router_eps_decay: coordinate descent. route_ff: False keeps the dense feed-forward.
    light_ff_mult / heavy_ff_mult: hidden widths of the feed-forward branches (x dim).
    cross_attention: the mixer attends from x to routed tokens of `context`.
    backend: of the routers' coordinate descent and the light local attention ('auto' = Triton on CUDA).
    cuda_graphs: the causal attention and feed-forward replay their forward (and backward) from per-shape
    CUDA graphs on CUDA inputs without a padding mask (graphs.py); false = always eager.
    """

    num_routed_q: int = 64
    num_routed_kv: int = 64
    num_routed_ff: int = 64
    window_routed_q: int = 16
    window_routed_ff: int = 16
    router_iters: int = 50
    router_eps: float = 0.1
    router_eps_init: float = 1.0
    router_eps_decay: float = 0.85
    light_window: int = 64
    heavy_window: int = 128
    num_kv_routing_tokens: int = 1
    heavy_heads: int = 0
    light_heads: int = 0
    route_ff: bool = True
    light_ff_mult: float = 0.5
    heavy_ff_mult: float = 4.0
    route_block_size: int = 0
    cross_attention: bool = False
    backend: str = "auto"
    cuda_graphs: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("num_routed_q", "num_routed_kv", "num_routed_ff", "router_iters", "light_window",
                     "heavy_window", "num_kv_routing_tokens"):
            check_int(self, name, min=1)
        for name in ("window_routed_q", "window_routed_ff"):
            check_int(self, name, min=1)
            if getattr(self, name) > self.heavy_window:
                raise ConfigError(f"{self.method}.{name}: got {getattr(self, name)} tokens per window of "
                                  f"heavy_window={self.heavy_window}; allowed: 1 <= {name} <= heavy_window")
        for name in ("heavy_heads", "light_heads", "route_block_size"):
            check_int(self, name, min=0)
        check_float(self, "router_eps", min=0.0, min_exclusive=True)
        check_float(self, "router_eps_init", min=0.0, min_exclusive=True)
        check_float(self, "router_eps_decay", min=0.0, max=1.0, min_exclusive=True)
        check_float(self, "light_ff_mult", min=0.0, min_exclusive=True)
        check_float(self, "heavy_ff_mult", min=0.0, min_exclusive=True)
        check_bool(self, "route_ff")
        check_bool(self, "cross_attention")
        check_bool(self, "cuda_graphs")
        check_choice(self, "backend", BACKENDS)
        heavy = self.heavy_heads or self.heads
        if heavy % self.num_kv_routing_tokens:
            raise ConfigError(
                f"{self.method}.num_kv_routing_tokens: got {self.num_kv_routing_tokens}; each kv router "
                f"serves a group of heads, so it must divide heavy_heads ({heavy})")
        if self.causal:
            if self.cross_attention:
                raise ConfigError(f"{self.method}.cross_attention: routed cross attention has no causal "
                                  "form; allowed with causal=false only")

    def check_seq_len(self, seq_len: int) -> None:
        names = ["num_routed_kv"] if self.causal else ["num_routed_q", "num_routed_kv"]
        if self.route_ff and not self.causal:
            names.append("num_routed_ff")
        for name in names:
            value = getattr(self, name)
            if value > seq_len:
                raise ConfigError(f"{self.method}.{name}: got {value} routed tokens for sequences of "
                                  f"{seq_len} tokens; allowed: 1 <= {name} <= {seq_len}")
        self._check_routing_acts(seq_len, names)
        if self.route_block_size and not self.causal:
            blocks = -(-seq_len // self.route_block_size)
            for name in names:
                if getattr(self, name) < blocks:
                    raise ConfigError(
                        f"{self.method}.{name}: got {getattr(self, name)} for {blocks} route blocks "
                        f"(route_block_size={self.route_block_size}, T={seq_len}); each block routes "
                        f"{name} // blocks tokens, so allowed: >= {blocks}")

    def _check_routing_acts(self, seq_len: int, names: list[str]) -> None:
        """Every routing knob selects: fewer tokens than there are to route from."""
        if not self.causal:
            for name in names:
                value = getattr(self, name)
                check_acts(self, name, value < seq_len, f"{name}={value} routes all {seq_len} tokens")
            return
        window = self.heavy_window
        windows = -(-seq_len // window)
        longest_past = (windows - 1) * window  # key/values come from the strict past of each window
        check_acts(self, "heavy_window", windows > 1, f"heavy_window={window} puts all {seq_len} tokens in one "
                   f"window, which has no past to route key/values from")
        check_acts(self, "num_routed_kv", self.num_routed_kv < longest_past,
                   f"num_routed_kv={self.num_routed_kv} routes the whole past of every window (at most "
                   f"{longest_past} tokens at T={seq_len}, heavy_window={window})")
        for name in ("window_routed_q", "window_routed_ff") if self.route_ff else ("window_routed_q",):
            value = getattr(self, name)
            check_acts(self, name, value < min(window, seq_len),
                       f"{name}={value} routes every token of a {min(window, seq_len)}-token window")

    @property
    def heavy_head_count(self) -> int:
        return self.heavy_heads or self.heads

    @property
    def light_head_count(self) -> int:
        return self.light_heads or self.heads

    def router_kwargs(self) -> dict:
        return {"n_iters": self.router_iters, "eps": self.router_eps, "eps_init": self.router_eps_init,
                "eps_decay": self.router_eps_decay, "backend": self.backend}
