"""The sampler registry: one entry per sampler, diffusers-backed or native.

A sampler's tunable options live in conf/sampler/<name>.yaml (Hydra keys under `sampler.`);
what makes it *that* algorithm (for example DPM-Solver++'s algorithm_type) is fixed here.
"""

from __future__ import annotations

from functools import partial

from samplebench.errors import UsageError
from samplebench.samplers.base import NfeRule, SamplerSpec
from samplebench.samplers.diffusers_loop import run_scheduler
from samplebench.samplers.ipndm import sample_ipndm

ONE = NfeRule(1, 0)
HEUN = NfeRule(2, -1)  # a second evaluation on every step but the last
PLMS = NfeRule(1, 1)  # one extra evaluation in the first (second-order) step


def _diffusers(
    class_name: str,
    subschedule: bool = False,
    step_options: tuple[str, ...] = (),
    denoise_to_zero: bool = False,
    **fixed,
):
    return partial(
        run_scheduler,
        class_name=class_name,
        fixed=fixed,
        step_options=step_options,
        subschedule=subschedule,
        denoise_to_zero=denoise_to_zero,
    )


def _spec(name, title, kind, rule, run, source, step_options=()):
    return SamplerSpec(name, title, kind, rule, run, source, tuple(step_options))


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        _spec(
            "ddim",
            "DDIM",
            "ode",
            ONE,
            _diffusers("DDIMScheduler", True, ("eta",)),
            "Song et al. 2021, arXiv:2010.02502",
            ("eta",),
        ),
        _spec(
            "ddpm",
            "DDPM ancestral",
            "sde",
            ONE,
            _diffusers("DDPMScheduler"),
            "Ho et al. 2020, arXiv:2006.11239",
        ),
        _spec(
            "pndm",
            "PNDM (PLMS)",
            "ode",
            PLMS,
            _diffusers("PNDMScheduler", True, skip_prk_steps=True),
            "Liu et al. 2022, arXiv:2202.09778",
        ),
        _spec(
            "euler",
            "Euler",
            "ode",
            ONE,
            _diffusers("EulerDiscreteScheduler"),
            "Karras et al. 2022, arXiv:2206.00364, Alg. 1 without the Heun correction",
        ),
        _spec(
            "euler_a",
            "Euler ancestral",
            "sde",
            ONE,
            _diffusers("EulerAncestralDiscreteScheduler"),
            "k-diffusion sample_euler_ancestral",
        ),
        _spec(
            "heun",
            "Heun",
            "ode",
            HEUN,
            _diffusers("HeunDiscreteScheduler"),
            "Karras et al. 2022, arXiv:2206.00364, Alg. 1",
        ),
        _spec(
            "dpm2",
            "DPM2",
            "ode",
            HEUN,
            _diffusers("KDPM2DiscreteScheduler"),
            "k-diffusion sample_dpm_2 (DPM-Solver-2 in sigma)",
        ),
        _spec(
            "lms",
            "LMS",
            "ode",
            ONE,
            _diffusers("LMSDiscreteScheduler", step_options=("order",)),
            "k-diffusion sample_lms (linear multistep)",
            ("order",),
        ),
        _spec(
            "deis",
            "DEIS (tAB)",
            "ode",
            PLMS,
            _diffusers("DEISMultistepScheduler", denoise_to_zero=True),
            "Zhang & Chen 2023, arXiv:2204.13902; diffusers stops at the last noise level, "
            "so one more evaluation denoises to zero",
        ),
        _spec(
            "dpm",
            "DPM-Solver (multistep, noise prediction)",
            "ode",
            PLMS,
            _diffusers(
                "DPMSolverMultistepScheduler",
                algorithm_type="dpmsolver",
                final_sigmas_type="sigma_min",
                denoise_to_zero=True,
            ),
            "Lu et al. 2022, arXiv:2206.00927; denoise_to_zero as in its reference code",
        ),
        _spec(
            "dpmpp",
            "DPM-Solver++(2M)",
            "ode",
            ONE,
            _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++"),
            "Lu et al. 2022, arXiv:2211.01095",
        ),
        _spec(
            "dpmpp_3m",
            "DPM-Solver++(3M)",
            "ode",
            ONE,
            _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++"),
            "Lu et al. 2022, arXiv:2211.01095",
        ),
        _spec(
            "dpmpp_2s",
            "DPM-Solver++(2S)",
            "ode",
            ONE,
            _diffusers("DPMSolverSinglestepScheduler", algorithm_type="dpmsolver++"),
            "Lu et al. 2022, arXiv:2211.01095 (singlestep)",
        ),
        _spec(
            "dpmpp_sde",
            "DPM-Solver++(2M) SDE",
            "sde",
            ONE,
            _diffusers("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
            "Lu et al. 2022, arXiv:2211.01095 (SDE variant)",
        ),
        _spec(
            "unipc",
            "UniPC (bh2)",
            "ode",
            ONE,
            _diffusers("UniPCMultistepScheduler"),
            "Zhao et al. 2023, arXiv:2302.04867",
        ),
        _spec("ipndm", "iPNDM", "ode", ONE, sample_ipndm, "Zhang & Chen 2023, arXiv:2204.13902, iPNDM"),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise UsageError(f"sampler={name} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
