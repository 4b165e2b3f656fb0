"""Quality matching: sparsity, the quality-equivalence factor q, the qs verdict, the dense twin.

q comes from a loss ratio through a pure power law L(N) ~ N^-alpha (Kaplan et al.,
alpha_N = 0.076, no irreducible term): a dense model q times larger reaches the MoE's loss.
The dense twin has q*s*N_total parameters (paper eq. 8) with the MoE's attention, KV layout,
embeddings and dtypes; only its FFN width is solved for.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import SpecError
from .sizes import ffn_matrices, non_ffn_params, total_params
from .specs import ModelSpec

KAPLAN_ALPHA = 0.076
DEFAULT_Q = 5.0


def sparsity(num_experts: int, top_k: int) -> float:
    """s = k/E."""
    if num_experts <= 0:
        raise SpecError("num_experts", f"must be > 0, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise SpecError("top_k", f"must be in 1..num_experts={num_experts}, got {top_k}")
    return top_k / num_experts


def q_from_losses(dense_loss: float, moe_loss: float, alpha: float = KAPLAN_ALPHA) -> float:
    """q = (L_dense / L_moe)^(1/alpha): the dense size multiple that matches the MoE's loss."""
    if dense_loss <= 0 or moe_loss <= 0:
        raise SpecError("loss", f"losses must be > 0, got dense={dense_loss}, moe={moe_loss}")
    if alpha <= 0:
        raise SpecError("alpha", f"must be > 0, got {alpha}")
    return float((dense_loss / moe_loss) ** (1.0 / alpha))


def qs_product(q: float, s: float) -> float:
    return q * s


def qs_verdict(q: float, s: float) -> str:
    """The qs inequality (paper eq. 7): below 1 the MoE moves more FFN bytes per token."""
    qs = q * s
    if qs < 1.0:
        return "moe-disadvantaged"
    if qs > 1.0:
        return "moe-advantaged"
    return "break-even"


def _check_q(q: float) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0:
        raise SpecError("q", f"must be a number > 0, got {q!r}")


def dense_twin(model: ModelSpec, q: float = DEFAULT_Q) -> ModelSpec:
    """The quality-matched dense model: N_dense = q*s*N_total, same attention and KV layout.

    Every layer gets one dense FFN of the width that makes the parameter count come out; the
    width is rounded to a whole number, so N_dense is exact to about one FFN column.
    """
    _check_q(q)
    if not model.is_moe:
        raise SpecError("model", f"{model.name} is dense; a dense twin needs an MoE model")
    target = q * model.sparsity * total_params(model)
    ffn_params = target - non_ffn_params(model)
    per_column = ffn_matrices(model) * model.hidden_size * model.num_layers
    width = round(ffn_params / per_column)
    if width < 1:
        raise SpecError(
            "q",
            f"q*s*N = {target:.3g} parameters is smaller than {model.name}'s "
            "attention and embeddings alone",
            "use a larger q",
        )
    return replace(
        model,
        name=f"{model.name}-dense-q{q:g}",
        intermediate_size=width,
        num_experts=0,
        experts_per_token=0,
        moe_intermediate_size=0,
        num_moe_layers=0,
        num_shared_experts=0,
        shared_expert_intermediate_size=0,
        expert_weight_dtype=model.weight_dtype,
    )
