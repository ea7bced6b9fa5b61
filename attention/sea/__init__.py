"""SEA (Lee et al., ICLR 2024): sparse attention over a top-k mask estimated in a compressed key width by
Performer attention and a predictor network; linear in T in training and inference."""

from attention.registry import Capabilities, register
from attention.sea.config import SeaConfig
from attention.sea.estimator import MaskPredictor, compressed_attention, estimation_losses, performer_bin_mass
from attention.sea.geometry import KeyGeometry, key_geometry
from attention.sea.mask import SparseMask, expand_cells, mask_density, mask_to_dense, select_cells
from attention.sea.mixer import SeaAttention
from attention.sea.sparse import sparse_attention, sparse_attention_torch

register("sea", SeaConfig, Capabilities(causal=True, cross=False, padding_mask=True),
         "SEA: sparse attention over a top-k mask estimated by Performer + CNN in a compressed width")(SeaAttention)

__all__ = [
    "KeyGeometry", "MaskPredictor", "SeaAttention", "SeaConfig", "SparseMask", "compressed_attention",
    "estimation_losses", "expand_cells", "key_geometry", "mask_density", "mask_to_dense", "performer_bin_mass",
    "select_cells", "sparse_attention", "sparse_attention_torch",
]
