"""Gaussian-score teleportation (Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score
Approximation for Diffusion Models and its Applications", TMLR 2024, arXiv:2412.09726; official
code Animadversio/GaussianTeleportationDiffusion, `gaussian_teleport/analytical_score_lib.py`
Gaussian_score and the EDM closed-form trajectory of its benchmark scripts).

At high noise the learned denoiser is close to that of a Gaussian with the data's mean mu and
covariance S = U diag(lam) U^T, D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu). Its probability-
flow ODE dx/dsigma = (x - D) / sigma is linear, and each whitened coordinate
(U^T (x - mu))_k / sqrt(lam_k + sigma^2) is constant along it, so

    x(sigma') = mu + U diag(sqrt((lam + sigma'^2) / (lam + sigma^2))) U^T (x(sigma) - mu)

carries a sample from sigma_max to a lower level without the network. A registered sampler (`base`)
then takes over. As in the official EDM code (which restarts the schedule at t_steps[skip]), the cell
builds its schedule for N + skip steps, the first `skip` intervals are crossed analytically and the
base sampler spends its N steps on the rest: the counted NFE are the base sampler's, and the
teleport's cost (a few matrix products per batch) is inside the cell's timing.

Under classifier-free guidance w != 1 the Gaussian field is the guided one, D_u + w (D_c - D_u) with
the unconditional and conditional moments. Its ODE is linear too, but the two covariances need not
commute, so there is no closed form: it is integrated with classical RK4 in log sigma (steps of at
most 0.01 in log sigma, error ~1e-9 relative on the analytic model), not with the network.

The data moments come from the model (`gaussian_moments(cond)`): exact for the analytic model (for a
component label, the component itself, so teleportation is exact there; for the unconditional
label, the mixture's moment-matched Gaussian). For image models they come from a reference image folder
(`sampler.moments=<folder>`), as the authors use their datasets' statistics: the images are resized to
the model's resolution, encoded to sampler states (the VAE posterior mean, scaled as the pipeline does;
the pixels for pixel-space models), and their mean and principal components (rank n - 1 for n images)
are computed once and cached under <results_dir>/.cache/teleport/. Directions outside the components
get variance 0 (x - mu scales by sigma'/sigma there, as in the authors' low-rank form). A reference set
has no per-prompt or per-class statistics, so the conditional and unconditional Gaussians coincide and
the guided field is that same Gaussian's, whatever the guidance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from samplebench.errors import UsageError
from samplebench.models import is_analytic
from samplebench.samplers.base import Denoiser, NfeRule, SamplerContext
from samplebench.samplers.reference import encoded_reference, reference_digest, reference_paths
from samplebench.schedules import Grid

# ODE samplers a teleport can hand over to (each runs at its registered defaults; euler is left out
# because deterministic DDIM is the same algorithm on x = x_0 + sigma n).
BASES = ("ddim", "heun", "dpmpp", "dpmpp_3m", "unipc", "ipndm", "deis")
RK4_MAX_STEP = 0.01  # in log sigma
# Reference-folder moments of this process, by (images' digest, device): read once, not per batch.
_MOMENTS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _moments(model: Any, cond: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not hasattr(model, "gaussian_moments"):
        raise UsageError(
            f"sampler=teleport on model={model.name} needs the data's statistics: set "
            "sampler.moments=<folder of reference images>"
        )
    return model.gaussian_moments(cond)


def reference_moments(
    model: Any, folder: str | Path, cache_root: Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (d,), principal directions (d, r) and variances (r,) of the reference images' sampler states,
    float64 on the model's device; cached per (images' content, encoder weights, resolution)."""
    from samplebench import cache

    paths = reference_paths(folder, "sampler.moments", at_least=2)  # a covariance needs 2
    digest = reference_digest(model, paths)
    memo = (digest, str(model.device))
    if memo in _MOMENTS:  # every batch after the first (the warm-up call) of a process
        return _MOMENTS[memo]
    path = None if cache_root is None else Path(cache_root) / "teleport" / f"{digest}.npz"
    found = None if path is None or not path.exists() else cache.load(path, ("mean", "vectors", "values"))
    if found is None:
        data = encoded_reference(model, paths).reshape(len(paths), -1)
        mean = data.mean(0)
        _, sv, vt = torch.linalg.svd(data - mean, full_matrices=False)
        keep = sv > sv[0] * 1e-10  # drop the null directions of n - 1 < d samples
        found = {
            "mean": mean.numpy(),
            "vectors": vt[keep].T.contiguous().numpy(),
            "values": (sv[keep] ** 2 / (len(data) - 1)).numpy(),
        }
        if path is not None:
            cache.save(path, **found)
    device = model.device
    _MOMENTS[memo] = tuple(
        torch.as_tensor(found[k], dtype=torch.float64, device=device) for k in ("mean", "vectors", "values")
    )
    return _MOMENTS[memo]


def gaussian_flow_map(
    x: torch.Tensor,
    sigma: float,
    sigma_to: float,
    mean: torch.Tensor,
    vectors: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """The exact PF-ODE map of N(mean, U diag(values) U^T) data from level sigma to sigma_to: x (B, d),
    mean (B, d) or (d,), vectors (B, d, r) or (d, r) with orthonormal columns, values (B, r) or (r,).
    Where r < d, the rest of x - mean (variance 0) scales by sigma_to / sigma."""
    centred = x - mean
    z = _project(vectors, centred)
    moved = _back(vectors, z * ((values + sigma_to**2) / (values + sigma**2)).sqrt())
    if vectors.shape[-1] == vectors.shape[-2]:  # full rank: nothing outside the components
        return mean + moved
    rest = centred - _back(vectors, z)
    return mean + moved + rest * (sigma_to / sigma)


def _project(vectors: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U^T v per sample: one shared (d, r) basis as a matrix product, per-sample bases batched."""
    return v @ vectors if vectors.dim() == 2 else torch.einsum("bdk,bd->bk", vectors, v)


def _back(vectors: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """U z per sample (the inverse of _project on the span of U)."""
    return z @ vectors.T if vectors.dim() == 2 else torch.einsum("bdk,bk->bd", vectors, z)


def gaussian_denoiser(
    x: torch.Tensor, sigma: float, mean: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu) of Gaussian data (Tweedie; the official
    Gaussian_score times sigma^2, plus x); shapes as in gaussian_flow_map."""
    z = _project(vectors, x - mean) * (values / (values + sigma**2))
    return mean + _back(vectors, z)


def guided_gaussian_flow(
    x: torch.Tensor, sigma: float, sigma_to: float, uncond: tuple, cond: tuple, guidance: float
) -> torch.Tensor:
    """The PF-ODE of the guided Gaussian denoiser D_u + w (D_c - D_u), integrated with RK4 in
    u = log sigma: dx/du = x - D(x; e^u)."""

    def field(y: torch.Tensor, u: float) -> torch.Tensor:
        s = math.exp(u)
        d_u = gaussian_denoiser(y, s, *uncond)
        d_c = gaussian_denoiser(y, s, *cond)
        return y - (d_u + guidance * (d_c - d_u))

    u0, u1 = math.log(sigma), math.log(sigma_to)
    n = max(1, math.ceil(abs(u1 - u0) / RK4_MAX_STEP))
    h = (u1 - u0) / n
    for i in range(n):
        u = u0 + i * h
        k1 = field(x, u)
        k2 = field(x + 0.5 * h * k1, u + 0.5 * h)
        k3 = field(x + 0.5 * h * k2, u + 0.5 * h)
        k4 = field(x + h * k3, u + h)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def teleport(
    x: torch.Tensor, sigma: float, sigma_to: float, context: SamplerContext, moments_folder: str | None = None
) -> torch.Tensor:
    """Carry x from sigma to sigma_to under the Gaussian approximation of the (guided) data, in float64."""
    model, shape = context.model, x.shape
    flat = x.reshape(shape[0], -1).double()
    if moments_folder:  # one Gaussian for every condition: the guided field is that Gaussian's
        stats = reference_moments(model, moments_folder, context.cache_root)
        return gaussian_flow_map(flat, sigma, sigma_to, *stats).to(x.dtype).reshape(shape)
    cond = _moments(model, context.cond)
    if context.guidance == 1.0:
        out = gaussian_flow_map(flat, sigma, sigma_to, *cond)
    else:
        uncond = _moments(model, model.null_condition(context.cond))
        out = guided_gaussian_flow(flat, sigma, sigma_to, uncond, cond, float(context.guidance))
    return out.to(x.dtype).reshape(shape)


def _check(options: dict[str, Any]) -> tuple[str, int]:
    base, skip = str(options.get("base", "dpmpp")), options.get("skip", 2)
    if base not in BASES:
        raise UsageError(f"sampler.base={base} cannot follow a teleport; choose one of {', '.join(BASES)}")
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise UsageError(
            f"sampler.skip={skip} must be a whole number of schedule steps >= 0 (0: no teleport)"
        )
    return base, skip


def teleport_rule(options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
    """The base sampler's rule on N steps, for a schedule of N + skip steps: p (N + skip) + o - p skip."""
    from samplebench.samplers import get_sampler

    base, skip = _check(options)
    rule = get_sampler(base).rule({}, schedule)
    return NfeRule(rule.per_step, rule.offset - rule.per_step * skip)


def run_teleport(
    denoise: Denoiser,
    x: torch.Tensor,
    grid: Grid,
    options: dict[str, Any],
    generators: list[torch.Generator] | None,
    context: SamplerContext | None = None,
) -> torch.Tensor:
    """Teleport from grid.sigmas[0] to grid.sigmas[skip], then run `base` on the rest of the grid."""
    from samplebench.samplers import get_sampler

    base, skip = _check(options)
    if skip >= grid.steps:
        raise UsageError(
            f"sampler.skip={skip} leaves no step for sampler.base={base}; lower skip or raise nfe"
        )
    if skip:
        if context is None:
            raise ValueError("teleport needs a SamplerContext (the model and conditions)")
        x = teleport(x, float(grid.sigmas[0]), float(grid.sigmas[skip]), context, options.get("moments"))
    rest = Grid(grid.sigmas[skip:], grid.schedule, grid.ends, grid.noise)
    return get_sampler(base).run(denoise, x, rest, {}, generators, context)


def model_check(options: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """At plan time: the analytic model has exact moments and takes no folder; image models need one."""
    _, skip = _check(options)
    moments = options.get("moments")
    if is_analytic(str(model_cfg.get("name"))):
        if moments:
            raise UsageError("sampler.moments is for image models; model=gmm has exact moments (drop it)")
    elif skip and not moments:
        raise UsageError(
            f"sampler=teleport on model={model_cfg.get('name')} needs the data's statistics: set "
            "sampler.moments=<folder of reference images>"
        )
    elif moments and not Path(str(moments)).expanduser().is_dir():
        raise UsageError(
            f"sampler.moments={moments} is not a folder; point it at a folder of reference images"
        )


run_teleport.accepts = ("base", "skip", "moments")  # type: ignore[attr-defined]
