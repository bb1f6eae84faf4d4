"""Exact models: data from a Gaussian mixture, noised by a diffusers beta schedule (`gmm`) or by the
rectified-flow interpolant x_t = (1 - t) x_0 + t n (`gmm_flow`).

With x_t = a x_0 + s n and y = x_t / a = x_0 + sigma n (sigma = s / a), y given component k is
N(mu_k, S_k + sigma^2 I). Tweedie's formula gives the exact noise prediction
eps(y, sigma) = -sigma * grad_y log p_sigma(y), conditional on k or for the whole mixture, so
classifier-free guidance eps_u + w (eps_c - eps_u) behaves exactly as it does for image models.

`gmm_flow` predicts the exact velocity E[n - x_0 | x_t] of the same mixture, computed in flow
coordinates from x_t | k ~ N((1 - t) mu_k, (1 - t)^2 S_k + t^2 I) (a formula of its own, not the
VP model's), and reaches samplers through the same velocity -> D conversion as SD3 and FLUX
(models.base.flow_denoise). Both models share one EDM denoiser D(x; sigma) = E[x_0 | x_0 + sigma n = x]:
their ODEs are the same paths under x_t = x / (1 + sigma), t = sigma / (1 + sigma), which
tests/test_gmm_flow.py checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule, flow_denoise, flow_schedule, sigmas_from_alphas_cumprod
from samplebench.seeds import STREAM_CONDITION, generator

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "vp_sde")
SPECTRA = ("uniform", "log_spaced")


@dataclass(frozen=True)
class MixtureSpec:
    """The mixture and its noise schedule, as configured under `model.` (a preset's values, then the
    keys given on the command line; PRESETS below). The field defaults are the `classic` preset."""

    dim: int = 16
    components: int = 8
    spread: float = 3.0  # standard deviation of the component means (unused when `tree` is set)
    scale: float = 1.0  # largest standard deviation inside a component
    min_scale: float = 0.5  # smallest standard deviation inside a component
    seed: int = 0
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    shift: float = 1.0  # gmm_flow: the static time shift of its flow schedule (SD3: 3.0)
    preset: str = "classic"
    # Means on a tree: level l adds N(0, tree[l]^2 I) per child, `branch` children per node, so
    # components = branch ** len(tree) and the mixture has structure at every scale of `tree`.
    tree: tuple[float, ...] | None = None
    branch: int = 4
    # "uniform": each direction's std drawn log-uniformly in [min_scale, scale] (classic);
    # "log_spaced": the dim stds of a component spaced evenly in log from scale down to min_scale
    # (each jittered by a factor e^U(-0.2, 0.2)), so that every noise level in between has structure.
    spectrum: str = "uniform"
    sigma_min: float = 0.002  # beta_schedule=vp_sde: the smallest and largest training noise levels
    sigma_max: float = 80.0


# Named mixtures (`model.preset=`). `classic` is the mixture model=gmm had before presets existed: its
# draws are unchanged, so results and baselines made before presets existed are reproduced with
# model.preset=classic. `image` is the default: built so that samplers rank as they do on image models
# (bench/bench_calibration.py, BENCHMARKS.md "Calibration"): structure at every noise level (a tree of
# means and log-spaced component spectra), on EDM's VP noise range [0.002, 80].
PRESETS: dict[str, dict[str, Any]] = {
    "classic": dict(
        dim=16,
        components=8,
        spread=3.0,
        scale=1.0,
        min_scale=0.5,
        tree=None,
        spectrum="uniform",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    ),
    "image": dict(
        dim=16,
        tree=(8.0, 2.0, 0.5),
        branch=4,
        components=64,
        scale=5.0,
        min_scale=0.003,
        spectrum="log_spaced",
        beta_schedule="vp_sde",
        sigma_min=0.002,
        sigma_max=80.0,
    ),
}
DEFAULT_PRESET = "image"
# Each analytic model's preset when its config names none: gmm_flow keeps the classic mixture its tests,
# benchmarks and baselines were made on (model.preset=image gives it the image mixture).
MODEL_PRESETS = {"gmm": DEFAULT_PRESET, "gmm_flow": "classic"}


def resolve_spec(fields: dict[str, Any]) -> MixtureSpec:
    """The MixtureSpec of a preset (`preset`, default DEFAULT_PRESET) with the given non-null keys on top."""
    name = fields.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise UsageError(f"model.preset={name} is unknown; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in fields.items() if v is not None and k != "preset"}
    merged = {**PRESETS[name], **given, "preset": name}
    if merged.get("tree") is not None:
        merged["tree"] = tuple(float(v) for v in merged["tree"])
        if "components" not in given:
            merged["components"] = int(merged["branch"]) ** len(merged["tree"])
    return MixtureSpec(**merged)


def vp_sde_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n training levels of the VP SDE (Song et al. 2021, arXiv:2011.13456; beta_min 0.1, beta_max 20,
    the schedule of EDM's VP models) between sigma_min and sigma_max, evenly spaced in its time t:
    sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1, beta_d = 19.9."""
    b_min, b_d = 0.1, 19.9

    def t_of(s: float) -> float:
        return (-b_min + math.sqrt(b_min**2 + 2 * b_d * math.log1p(s * s))) / b_d

    t = np.linspace(t_of(sigma_min), t_of(sigma_max), n)
    return np.sqrt(np.expm1(0.5 * b_d * t * t + b_min * t))


def check_spec(spec: MixtureSpec) -> None:
    """One-line errors for mixture keys a model cannot be built from."""
    if spec.beta_schedule not in BETA_SCHEDULES:
        raise UsageError(
            f"model.beta_schedule={spec.beta_schedule} is unknown; choose vp_sde or a diffusers beta "
            f"schedule: {', '.join(b for b in BETA_SCHEDULES if b != 'vp_sde')}"
        )
    if spec.dim < 1 or spec.components < 1:
        raise UsageError("model.dim and model.components must be positive integers")
    if spec.spectrum not in SPECTRA:
        raise UsageError(f"model.spectrum={spec.spectrum} is unknown; choose one of {', '.join(SPECTRA)}")
    if not 0 < spec.min_scale <= spec.scale:
        raise UsageError(
            f"model.min_scale={spec.min_scale} and model.scale={spec.scale} must satisfy "
            "0 < min_scale <= scale"
        )
    if spec.tree is not None:
        if spec.branch < 1 or not spec.tree or any(not v >= 0 for v in spec.tree):
            raise UsageError("model.tree must be a list of spreads >= 0 and model.branch a positive integer")
        if spec.components != spec.branch ** len(spec.tree):
            raise UsageError(
                f"model.components={spec.components} does not match model.tree: a tree of {len(spec.tree)} "
                f"levels with branch={spec.branch} has {spec.branch ** len(spec.tree)} components; "
                "leave model.components unset"
            )
    if spec.beta_schedule == "vp_sde" and not 0 < spec.sigma_min < spec.sigma_max:
        raise UsageError(
            f"model.sigma_min={spec.sigma_min} and model.sigma_max={spec.sigma_max} must satisfy "
            "0 < sigma_min < sigma_max"
        )


def draw_mixture(spec: MixtureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Means (K, D), eigenvectors (K, D, D; columns), standard deviations (K, D) and weights (K,) of the
    mixture, from its seed. The classic draws (spectrum uniform, no tree) keep their order, so every
    mixture made before presets existed is reproduced bit for bit."""
    rng = np.random.default_rng(spec.seed)
    d, k = spec.dim, spec.components
    if spec.tree is None:
        means = rng.normal(0.0, spec.spread, size=(k, d))
    else:
        means = np.zeros((1, d))
        for spread in spec.tree:
            children = rng.normal(0.0, spread, size=(len(means), spec.branch, d))
            means = (means[:, None, :] + children).reshape(-1, d)
    rotations = np.stack([np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(k)])
    if spec.spectrum == "uniform":
        stds = np.exp(rng.uniform(np.log(spec.min_scale), np.log(spec.scale), size=(k, d)))
    else:
        spaced = np.exp(np.linspace(np.log(spec.scale), np.log(spec.min_scale), d))
        stds = spaced[None] * np.exp(rng.uniform(-0.2, 0.2, size=(k, d)))
    weights = rng.dirichlet(np.full(k, 5.0))
    return means, rotations, stds, weights


class GaussianMixtureModel:
    """Class-conditional exact model. Label -1 means unconditional (the whole mixture)."""

    prediction_type = "epsilon"
    # Its calls are microsecond tensor ops on (batch, dim): on a CPU, intra-op threads only add
    # synchronisation, and when another process holds a core a multi-threaded call stalls for whole
    # scheduler slices (10x+ jumps between identical calls). The worker runs it on one thread.
    cpu_threads = 1

    def __init__(self, spec: MixtureSpec, device: torch.device, dtype: torch.dtype = torch.float64):
        check_spec(spec)
        self.spec = spec
        self.name = "gmm"
        self.device = device
        self.dtype = dtype
        self.sample_shape = (spec.dim,)
        self.num_classes = spec.components
        means, rotations, stds, weights = draw_mixture(spec)
        f64 = dict(dtype=torch.float64, device=device)
        self.means = torch.tensor(means, **f64)
        self.rotations = torch.tensor(rotations, **f64)  # columns are eigenvectors of S_k
        self.eigenvalues = torch.tensor(stds**2, **f64)
        self.weights = torch.tensor(weights, **f64)
        if spec.beta_schedule == "vp_sde":
            alphas_cumprod = 1 / (
                1 + vp_sde_sigmas(spec.sigma_min, spec.sigma_max, spec.num_train_timesteps) ** 2
            )
            self._betas = 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
            self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float64)
        else:
            # diffusers builds the betas; every sampler then gets them as trained_betas, so any schedule
            # DDPMScheduler knows works with every scheduler, and model and solver agree on each timestep.
            ddpm = DDPMScheduler(
                num_train_timesteps=spec.num_train_timesteps,
                beta_start=spec.beta_start,
                beta_end=spec.beta_end,
                beta_schedule=spec.beta_schedule,
            )
            self._betas = ddpm.betas.numpy().copy()
            self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        self.noise_schedule = NoiseSchedule("vp_discrete", sigmas_from_alphas_cumprod(self.alphas_cumprod))

    def scheduler_config(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=self.spec.num_train_timesteps,
            trained_betas=self._betas,
            prediction_type="epsilon",
        )

    # -- closed forms -------------------------------------------------------------------------
    def covariances(self) -> torch.Tensor:
        """S_k = U_k diag(lambda_k) U_k^T, shape (K, D, D)."""
        u = self.rotations
        return u @ torch.diag_embed(self.eigenvalues) @ u.transpose(-1, -2)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the whole mixture, in closed form."""
        w = self.weights
        mean = (w[:, None] * self.means).sum(0)
        second = (
            w[:, None, None] * (self.covariances() + self.means[:, :, None] * self.means[:, None, :])
        ).sum(0)
        return mean, second - mean[:, None] * mean[None, :]

    def gaussian_moments(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample, the mean, eigenvectors (columns) and eigenvalues of the data's covariance given
        its condition: component k itself for label k (exact: the data given k are Gaussian), the
        mixture's moment-matched Gaussian for label -1 (teleportation's Gaussian approximation)."""
        labels = cond.to(self.device)
        mean_all, cov_all = self.moments()
        values_all, vectors_all = torch.linalg.eigh(cov_all)
        k = labels.clamp(min=0)
        uncond = (labels < 0)[:, None]
        mean = torch.where(uncond, mean_all[None], self.means[k])
        values = torch.where(uncond, values_all[None], self.eigenvalues[k])
        vectors = torch.where(uncond[:, :, None], vectors_all[None], self.rotations[k])
        return mean, vectors, values

    def sample_data(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws from the mixture and their component labels."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=g)
        z = torch.randn(n, self.spec.dim, generator=g, dtype=torch.float64).to(self.device)
        labels = labels.to(self.device)
        x = (
            self.means[labels]
            + (self.rotations[labels] @ (self.eigenvalues[labels].sqrt() * z)[..., None])[..., 0]
        )
        return x, labels

    def _component_terms(self, y: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component: log pi_k + log N(y; mu_k, S_k + sigma^2 I), and (S_k + sigma^2 I)^-1 (y - mu_k)."""
        z = torch.einsum("kdc,bkd->bkc", self.rotations, y[:, None, :] - self.means[None])  # U^T (y - mu)
        var = self.eigenvalues[None] + (sigma**2)[:, None, None]  # (B, K, D)
        log_n = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.spec.dim * math.log(2 * math.pi))
        precision_times = torch.einsum("kdc,bkc->bkd", self.rotations, z / var)
        return self.weights.log()[None] + log_n, precision_times

    def log_density(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p_sigma(y) of the noised mixture (VE scale)."""
        logits, _ = self._component_terms(y, sigma)
        return torch.logsumexp(logits, dim=-1)

    def eps_ve(self, y: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Exact eps at VE input y; labels >= 0 select a component, -1 the whole mixture."""
        logits, prec = self._component_terms(y, sigma)
        resp = torch.softmax(logits, dim=-1)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), self.spec.components).to(resp.dtype)
        resp = torch.where((labels >= 0)[:, None], onehot, resp)
        return sigma[:, None] * (resp[..., None] * prec).sum(1)

    # -- the model protocol ---------------------------------------------------------------------
    def predict(
        self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        x64 = x.to(torch.float64)
        sigma = sigma.to(device=x.device, dtype=torch.float64).expand(x.shape[0])
        y = x64 * (1 + sigma**2).sqrt()[:, None]
        return self.eps_ve(y, sigma, cond).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Exact D(x; sigma) = x - sigma * eps(x, sigma) at VE input x (Tweedie), in float64."""
        x64 = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        return (x64 - sigma[:, None] * self.eps_ve(x64, sigma, cond)).to(x.dtype)

    def conditions(self, indices: list[int], seed: int) -> torch.Tensor:
        w = self.weights.cpu()
        labels = [
            int(torch.multinomial(w, 1, generator=generator(seed, i, STREAM_CONDITION))) for i in indices
        ]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, -1)

    def cat_conditions(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b])

    def describe_condition(self, cond: torch.Tensor) -> list[str]:
        return [f"component {int(c)}" for c in cond]


class FlowMixtureModel(GaussianMixtureModel):
    """The same mixture as a rectified-flow model (`model=gmm_flow`): predicts the exact velocity."""

    prediction_type = "flow"

    def __init__(self, spec: MixtureSpec, device: torch.device, dtype: torch.dtype = torch.float64):
        if not spec.shift > 0:
            raise UsageError(f"model.shift={spec.shift} must be positive (1 is no shift, SD3 uses 3.0)")
        super().__init__(spec, device, dtype)
        self.name = "gmm_flow"
        self.noise_schedule = flow_schedule(spec.num_train_timesteps, spec.shift)

    def scheduler_config(self) -> dict[str, Any]:
        return dict(num_train_timesteps=self.spec.num_train_timesteps, shift=self.spec.shift)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Exact E[n - x_0 | x_t] at flow time t (one per sample); labels >= 0 select a component."""
        a = (1 - t)[:, None, None]  # (B, 1, 1)
        b = t[:, None, None]
        centred = x_t[:, None, :] - a * self.means[None]  # x_t - (1 - t) mu_k, (B, K, D)
        z = torch.einsum("kdc,bkd->bkc", self.rotations, centred)
        var = a**2 * self.eigenvalues[None] + b**2  # eigenvalues of (1 - t)^2 S_k + t^2 I
        log_n = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.spec.dim * math.log(2 * math.pi))
        logits = self.weights.log()[None] + log_n
        resp = torch.softmax(logits, dim=-1)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), self.spec.components).to(resp.dtype)
        resp = torch.where((labels >= 0)[:, None], onehot, resp)
        # E[n | x_t, k] = t C^-1 c, E[x_0 | x_t, k] = mu_k + (1 - t) S_k C^-1 c, c = x_t - (1 - t) mu_k
        noise = b * z / var
        data_dev = a * self.eigenvalues[None] * z / var
        v_rot = noise - data_dev  # in each component's eigenbasis, without the mean
        v = torch.einsum("kdc,bkc->bkd", self.rotations, v_rot) - self.means[None]
        return (resp[..., None] * v).sum(1)

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        s = sigma.to(device=x.device, dtype=torch.float64).expand(x.shape[0])
        return self.velocity(x.to(torch.float64), s / (1 + s), cond).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) from the exact velocity, through the conversion flow image models use."""
        return flow_denoise(self, x, sigma, cond)
