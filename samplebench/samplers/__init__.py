"""The sampler registry: native samplers (pure functions over our denoiser, one module per family)
and the diffusers family (`diffusers:<name>`, one adapter over diffusers' schedulers).

A sampler's tunable options live in conf/sampler/<name>.yaml (Hydra keys under `sampler.`); what
makes it *that* algorithm (for example DPM-Solver++'s order 2) is fixed here. Adding a sampler is
one function, one line below and one conf file (README, "Adding a sampler").
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from samplebench.errors import UsageError
from samplebench.samplers.base import NfeRule, SamplerSpec
from samplebench.samplers.dc_solver import DC_ORDERS, REFERENCES, run_dc_solver
from samplebench.samplers.dc_solver import steps_check as steps_check_dc
from samplebench.samplers.dc_solver import validate as validate_dc
from samplebench.samplers.deis import (
    RK_TABLEAUX,
    sample_deis,
    sample_deis_rhoab,
    sample_deis_rhork,
    sample_deis_tab,
)
from samplebench.samplers.diffusers_loop import (
    FLOW_ONLY,
    diffusers_nfe_rule,
    kind_check,
    model_is_flow,
    run_scheduler,
)
from samplebench.samplers.dpm_solver import (
    sample_dpm_multistep,
    sample_dpm_singlestep,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s,
    sample_dpmpp_multistep,
)
from samplebench.samplers.dpm_solver_v3 import model_check_v3, run_dpm_solver_v3, validate_v3
from samplebench.samplers.euler import (
    sample_ddim,
    sample_dpm2,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from samplebench.samplers.fewstep import sample_lcm, sample_tcd, validate_gamma
from samplebench.samplers.flow import sample_flow_euler, sample_flow_heun
from samplebench.samplers.ipndm import sample_ipndm
from samplebench.samplers.momentum import sample_dpmpp_hb, sample_ghvb, sample_hb, validate_beta
from samplebench.samplers.teleport import BASES, model_check, run_teleport, teleport_rule
from samplebench.samplers.time_shift import check_options, sample_ts_ddim, sample_ts_dpmpp
from samplebench.samplers.unipc import sample_unipc
from samplebench.schedules import Grid

ONE = NfeRule(1, 0)
TWO_BUT_LAST = NfeRule(2, -1)  # a second evaluation on every step but the last (to 0)


def native(
    fn: Callable[..., torch.Tensor], with_noise: bool = False, **fixed: Any
) -> Callable[..., torch.Tensor]:
    """Registry adapter for `fn(denoise, x, sigmas, generators, **options)`; with_noise=True also
    passes the model's NoiseSchedule as `noise=` (a sampler that needs the model's time variable)."""

    def run(
        denoise, x: torch.Tensor, grid: Grid, options: dict[str, Any], generators, context=None
    ) -> torch.Tensor:
        extra = {"noise": grid.noise} if with_noise else {}
        return fn(denoise, x, grid.sigmas, generators, **{**options, **fixed, **extra})

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


def _single_rule(options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
    order = int(options.get("order", 3))
    return NfeRule(order, -(order - 1))  # `order` evaluations per step, one on the last step to 0


def _rk_rule(options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
    method = str(options.get("method", "3kutta"))
    if method not in RK_TABLEAUX:
        valid = ", ".join(RK_TABLEAUX)
        raise UsageError(
            f"sampler.method={method} is not valid for sampler=deis_rhork; choose one of {valid}"
        )
    stages = len(RK_TABLEAUX[method][0])
    return NfeRule(stages, -(stages - 1))  # every stage on each step, one evaluation on the last step to 0


SOLVER_TYPE = {"solver_type": ("midpoint", "heun")}
CHOICES = {
    "lms": {"order": (1, 2, 3, 4)},
    "ipndm": {"order": (1, 2, 3, 4)},
    "dpm": {"order": (1, 2, 3), **SOLVER_TYPE},
    "dpm_single": {"order": (2, 3)},
    "dpmpp": SOLVER_TYPE,
    "dpmpp_3m": SOLVER_TYPE,
    "dpmpp_sde": SOLVER_TYPE,
    "unipc": {"order": (1, 2, 3), "variant": ("bh1", "bh2")},
    "deis": {"order": (1, 2, 3)},
    "deis_tab": {"order": (1, 2, 3, 4)},
    "deis_rhoab": {"order": (1, 2, 3, 4)},
    "deis_rhork": {"method": tuple(RK_TABLEAUX)},
    "hb": {"order": (1, 2, 3, 4)},
    "ghvb": {"order": (1, 2, 3, 4)},
}


def _vp_only(name: str, instead: str) -> Any:
    """SamplerSpec.model_check: a sampler built on a discrete VP model's training time refuses a
    flow-matching model at plan time (when the config tells the kind without loading the model)."""

    def check(options: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        if model_is_flow(model_cfg):
            raise UsageError(
                f"sampler={name} needs a discrete diffusion (VP) model's training time, not a flow-matching "
                f"model's; use sampler={instead}"
            )

    return check


def _n(
    name,
    title,
    kind,
    rule,
    fn,
    source,
    repeats=False,
    with_noise=False,
    validate=None,
    model_check=None,
    **fixed,
) -> SamplerSpec:
    return SamplerSpec(
        name,
        title,
        kind,
        rule,
        native(fn, with_noise, **fixed),
        source,
        repeats_levels=repeats,
        choices=CHOICES.get(name, {}),
        validate=validate,
        model_check=model_check,
    )


MOMENTUM = "Wizadwongsa et al. 2024 (ICLR), arXiv:2307.11118; sWizad/momentum-diffusion"


NATIVE = [
    _n("ddim", "DDIM", "ode", ONE, sample_ddim, "Song et al. 2021, arXiv:2010.02502, eq. 12 (eta)"),
    _n(
        "euler",
        "Euler",
        "ode",
        ONE,
        sample_euler,
        "Karras et al. 2022, arXiv:2206.00364; k-diffusion sample_euler",
    ),
    _n(
        "euler_a", "Euler ancestral", "sde", ONE, sample_euler_ancestral, "k-diffusion sample_euler_ancestral"
    ),
    _n("heun", "Heun (EDM)", "ode", TWO_BUT_LAST, sample_heun, "Karras et al. 2022, Alg. 1", repeats=True),
    _n("dpm2", "DPM2", "ode", TWO_BUT_LAST, sample_dpm2, "k-diffusion sample_dpm_2 (DPM-Solver-2, r1=1/2)"),
    _n("lms", "LMS", "ode", ONE, sample_lms, "k-diffusion sample_lms (linear multistep in sigma)"),
    _n(
        "dpm",
        "DPM-Solver (multistep, noise prediction)",
        "ode",
        ONE,
        sample_dpm_multistep,
        "Lu et al. 2022, arXiv:2206.00927",
    ),
    _n(
        "dpm_single",
        "DPM-Solver (singlestep)",
        "ode",
        _single_rule,
        sample_dpm_singlestep,
        "Lu et al. 2022, arXiv:2206.00927, Alg. 1-2",
    ),
    _n(
        "dpmpp",
        "DPM-Solver++(2M)",
        "ode",
        ONE,
        sample_dpmpp_multistep,
        "Lu et al. 2022, arXiv:2211.01095, Alg. 2",
        order=2,
    ),
    _n(
        "dpmpp_3m",
        "DPM-Solver++(3M)",
        "ode",
        ONE,
        sample_dpmpp_multistep,
        "Lu et al. 2022, arXiv:2211.01095",
        order=3,
    ),
    _n(
        "dpmpp_2s",
        "DPM-Solver++(2S)",
        "ode",
        TWO_BUT_LAST,
        sample_dpmpp_2s,
        "Lu et al. 2022, arXiv:2211.01095, Alg. 1",
    ),
    _n(
        "dpmpp_sde",
        "DPM-Solver++(2M) SDE",
        "sde",
        ONE,
        sample_dpmpp_2m_sde,
        "k-diffusion sample_dpmpp_2m_sde",
    ),
    _n("unipc", "UniPC", "ode", ONE, sample_unipc, "Zhao et al. 2023, arXiv:2302.04867"),
    _n(
        "flow_euler",
        "Euler on flow time",
        "ode",
        ONE,
        sample_flow_euler,
        "Liu et al. 2023, arXiv:2209.03003; diffusers FlowMatchEulerDiscreteScheduler",
    ),
    _n(
        "flow_heun",
        "Heun on flow time",
        "ode",
        TWO_BUT_LAST,
        sample_flow_heun,
        "Esser et al. 2024, arXiv:2403.03206; diffusers FlowMatchHeunDiscreteScheduler",
        repeats=True,
    ),
    _n(
        "lcm",
        "LCM multistep consistency sampling",
        "sde",
        ONE,
        sample_lcm,
        "Luo et al. 2023, arXiv:2310.04378, Alg. 3; diffusers LCMScheduler.step",
    ),
    _n(
        "tcd",
        "TCD strategic stochastic sampling",
        "sde",
        ONE,
        sample_tcd,
        "Zheng et al. 2024, arXiv:2402.19159, eq. 7; diffusers TCDScheduler.step (gamma = eta)",
        with_noise=True,
        validate=validate_gamma,
    ),
    _n("ipndm", "iPNDM", "ode", ONE, sample_ipndm, "Zhang & Chen 2023, arXiv:2204.13902, iPNDM"),
    _n("deis", "DEIS (rho-AB)", "ode", ONE, sample_deis, "Zhang & Chen 2023, arXiv:2204.13902"),
    _n(
        "deis_tab",
        "tAB-DEIS",
        "ode",
        ONE,
        sample_deis_tab,
        "Zhang & Chen 2023 (ICLR), arXiv:2204.13902; qsh-zh/deis get_sampler_t_ab",
        with_noise=True,
        model_check=_vp_only("deis_tab", "deis_rhoab or deis_rhork"),
    ),
    _n(
        "deis_rhoab",
        "rhoAB-DEIS",
        "ode",
        ONE,
        sample_deis_rhoab,
        "Zhang & Chen 2023 (ICLR), arXiv:2204.13902; qsh-zh/deis get_sampler_rho_ab",
    ),
    _n(
        "deis_rhork",
        "rhoRK-DEIS",
        "ode",
        _rk_rule,
        sample_deis_rhork,
        "Zhang & Chen 2023 (ICLR), arXiv:2204.13902; qsh-zh/deis get_sampler_rho_rk",
        repeats=True,
    ),
    _n(
        "hb",
        "PLMS/iPNDM with heavy-ball momentum",
        "ode",
        ONE,
        sample_hb,
        f"{MOMENTUM} PLMSWithHBScheduler, hb_sample",
        validate=validate_beta,
    ),
    _n(
        "ghvb",
        "GHVB (generalised heavy ball)",
        "ode",
        ONE,
        sample_ghvb,
        f"{MOMENTUM} GHVBScheduler, ghvb_sample, AdamBmixer",
        validate=validate_beta,
    ),
    _n(
        "dpmpp_hb",
        "DPM-Solver++(2M) with heavy-ball momentum",
        "ode",
        ONE,
        sample_dpmpp_hb,
        f"{MOMENTUM} MomentumDPMSolverMultistepScheduler",
        validate=validate_beta,
    ),
    _n(
        "ts_ddim",
        "TS-DDIM (time-shift: shifted step target)",
        "shifted",
        ONE,
        sample_ts_ddim,
        "Li et al. 2024 (ICLR), arXiv:2305.15583; Mingxiao-Li/TS-DPM PNMSolver.apply_time_shift and "
        "PNMSolver.sample (sampler/pnm_solver.py, method='euler')",
        with_noise=True,
        validate=check_options,
    ),
    _n(
        "ts_dpmpp",
        "TS-DPM-Solver++(2M) (time-shift: shifted model input time)",
        "shifted",
        ONE,
        sample_ts_dpmpp,
        "Li et al. 2024 (ICLR), arXiv:2305.15583; Mingxiao-Li/TS-DPM DEIS_Sampler.apply_time_shift and "
        "its eps_fn (sampler/deis_sampler.py: shifted model input, scheduled coefficients), "
        "DPM_Solver.time_shift (sampler/dpm_solver_utils.py: window_size // 2)",
        with_noise=True,
        validate=check_options,
    ),
]


def _d(
    name: str,
    title: str,
    kind: str,
    class_name: str,
    source: str,
    per_step: int = 1,
    offset: int = 0,
    subschedule: bool = False,
    step_options: tuple[str, ...] = (),
    repeats: bool = False,
    models: str = "vp",
    **fixed: Any,
) -> SamplerSpec:
    """A diffusers entry; models: "vp", "flow" (FlowMatch schedulers) or "both" (DPM-Solver++ and UniPC,
    which run flow models with use_flow_sigmas: diffusers_loop.build_flow)."""
    run = partial(
        run_scheduler,
        class_name=class_name,
        fixed=fixed,
        step_options=step_options,
        subschedule=subschedule,
        name=f"diffusers:{name}",
        models=models,
    )
    rule = diffusers_nfe_rule(class_name, per_step, offset, subschedule, fixed, step_options, models)
    return SamplerSpec(
        f"diffusers:{name}",
        f"{title} (diffusers {class_name})",
        kind,
        rule,
        run,
        source,
        family="diffusers",
        grids=_grids(class_name, subschedule),
        repeats_levels=repeats,
        step_options=step_options,
        model_check=kind_check(f"diffusers:{name}", models),  # flow-only / VP-only schedulers
    )


def _grids(class_name: str, subschedule: bool) -> str:
    """Which schedules a diffusers scheduler can run (see diffusers_loop.schedule_arguments)."""
    import inspect

    import diffusers

    if class_name in FLOW_ONLY:  # flow models only (diffusers_loop.build_flow)
        return "any (flow times)" if class_name == "FlowMatchEulerDiscreteScheduler" else "flow (start=1)"
    cls = getattr(diffusers, class_name)
    init = set(inspect.signature(cls.__init__).parameters)
    setter = set(inspect.signature(cls.set_timesteps).parameters)
    if subschedule or "timesteps" in setter or ("sigmas" in setter and "use_flow_sigmas" not in init):
        return "any" + (" (integer timesteps)" if "sigmas" not in setter or "use_flow_sigmas" in init else "")
    names = [n for n in ("linspace", "leading", "trailing") if "timestep_spacing" in init]
    names += [
        n
        for n, f in (
            ("karras", "use_karras_sigmas"),
            ("logsnr", "use_exponential_sigmas"),
            ("exponential", "use_exponential_sigmas"),
        )
        if f in init
    ]
    return ",".join(names)


DIFFUSERS = [
    _d("ddim", "DDIM", "ode", "DDIMScheduler", "Song et al. 2021", subschedule=True, step_options=("eta",)),
    _d("ddpm", "DDPM ancestral", "sde", "DDPMScheduler", "Ho et al. 2020, arXiv:2006.11239"),
    _d(
        "pndm",
        "PNDM (PLMS)",
        "ode",
        "PNDMScheduler",
        "Liu et al. 2022, arXiv:2202.09778",
        offset=1,
        subschedule=True,
        repeats=True,
        skip_prk_steps=True,
    ),
    _d("euler", "Euler", "ode", "EulerDiscreteScheduler", "Karras et al. 2022"),
    _d(
        "euler_a",
        "Euler ancestral",
        "sde",
        "EulerAncestralDiscreteScheduler",
        "k-diffusion sample_euler_ancestral",
    ),
    _d(
        "heun",
        "Heun",
        "ode",
        "HeunDiscreteScheduler",
        "Karras et al. 2022, Alg. 1",
        per_step=2,
        offset=-1,
        repeats=True,
    ),
    _d("dpm2", "DPM2", "ode", "KDPM2DiscreteScheduler", "k-diffusion sample_dpm_2", per_step=2, offset=-1),
    _d("lms", "LMS", "ode", "LMSDiscreteScheduler", "k-diffusion sample_lms", step_options=("order",)),
    _d("deis", "DEIS", "ode", "DEISMultistepScheduler", "Zhang & Chen 2023"),
    _d(
        "dpm",
        "DPM-Solver (multistep, noise prediction)",
        "ode",
        "DPMSolverMultistepScheduler",
        "Lu et al. 2022",
        algorithm_type="dpmsolver",
        final_sigmas_type="sigma_min",
    ),
    _d(
        "dpmpp",
        "DPM-Solver++(2M)",
        "ode",
        "DPMSolverMultistepScheduler",
        "Lu et al. 2022",
        algorithm_type="dpmsolver++",
        solver_order=2,
        models="both",
    ),
    _d(
        "dpmpp_3m",
        "DPM-Solver++(3M)",
        "ode",
        "DPMSolverMultistepScheduler",
        "Lu et al. 2022",
        algorithm_type="dpmsolver++",
        solver_order=3,
        models="both",
    ),
    _d(
        "dpmpp_2s",
        "DPM-Solver++ singlestep",
        "ode",
        "DPMSolverSinglestepScheduler",
        "Lu et al. 2022",
        algorithm_type="dpmsolver++",
    ),
    _d(
        "dpmpp_sde",
        "DPM-Solver++(2M) SDE",
        "sde",
        "DPMSolverMultistepScheduler",
        "Lu et al. 2022",
        algorithm_type="sde-dpmsolver++",
    ),
    _d("unipc", "UniPC", "ode", "UniPCMultistepScheduler", "Zhao et al. 2023", models="both"),
    # Flow-matching models only (a flow model also runs the models="both" entries above).
    _d(
        "flow_euler",
        "Euler on flow time",
        "ode",
        "FlowMatchEulerDiscreteScheduler",
        "Esser et al. 2024, arXiv:2403.03206 (SD3)",
        models="flow",
    ),
    _d(
        "flow_heun",
        "Heun on flow time",
        "ode",
        "FlowMatchHeunDiscreteScheduler",
        "Esser et al. 2024, arXiv:2403.03206",
        per_step=2,
        offset=-1,
        repeats=True,
        models="flow",
    ),
    # LCM's boundary condition lives in the model's D (an LCM model's denoiser is f(x, t)), so the
    # scheduler's own is made the identity: timestep_scaling 1e15 gives c_skip < 1e-30 and c_out = 1.
    _d(
        "lcm",
        "LCM multistep",
        "sde",
        "LCMScheduler",
        "Luo et al. 2023, arXiv:2310.04378",
        timestep_scaling=1e15,
    ),
    _d("tcd", "TCD", "sde", "TCDScheduler", "Zheng et al. 2024, arXiv:2402.19159", step_options=("eta",)),
]

# Samplers that hand over to another registered sampler (after the registry above exists).
COMPOSED = [
    SamplerSpec(
        "teleport",
        "Gaussian teleportation, then a base sampler",
        "ode",
        teleport_rule,
        run_teleport,
        "Wang & Vastola 2024 (TMLR), arXiv:2412.09726; Animadversio/GaussianTeleportationDiffusion "
        "analytical_score_lib.Gaussian_score",
        skips_levels=True,
        needs_context=True,
        choices={"base": BASES},
        model_check=model_check,
    ),
    SamplerSpec(
        "dpm_solver_v3",
        "DPM-Solver-v3 (empirical model statistics)",
        "ode",
        ONE,
        run_dpm_solver_v3,
        "Zheng et al. 2023 (NeurIPS), arXiv:2310.13268; thu-ml/DPM-Solver-v3 dpm_solver_v3.py DPM_Solver_v3 "
        "and its EMS script compute_EMS_scoresde.py",
        needs_context=True,
        choices={
            "order": (1, 2, 3),
            "p_pseudo": (False, True),
            "use_corrector": (False, True),
            "c_pseudo": (False, True),
            "lower_order_final": (False, True),
        },
        validate=validate_v3,
        model_check=model_check_v3,
    ),
    SamplerSpec(
        "dc_solver",
        "DC-Solver (UniPC-bh2 with dynamic compensation)",
        "ode",
        ONE,
        run_dc_solver,
        "Zhao et al. 2024 (ECCV), arXiv:2409.03755; wl-zhao/DC-Solver scheduling_dcsolver_multistep.py "
        "(dynamic_compensation, find_optim_ratio, cascade_polynomial_regression)",
        needs_context=True,
        choices={"order": (1, 2, 3), "dc_order": DC_ORDERS, "reference": REFERENCES},
        validate=validate_dc,
        steps_check=steps_check_dc,
    ),
]

SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in NATIVE + DIFFUSERS + COMPOSED}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise UsageError(f"sampler={name} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
