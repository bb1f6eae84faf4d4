"""Benchmark (not a test): flow samplers on gmm_flow, their error against the exact flow ODE and their
measured order.

model=gmm_flow (shift 3, float64, 32 samples, guidance 1). Each sampler runs through the registry (the
same call generate makes) from x_T on three spacings of schedule=flow:

- `flow`: SD3's spacing from t = 1 (FlowMatchEulerDiscreteScheduler's), ending at the fixed last
  level t_f = shift(shift(1/T)) and then t = 0. Its target is the floor point (exact solve to t_f, then
  the exact denoiser's jump to 0: metrics.reference.solve_flow_with_floor), the point every sampler on
  this grid converges to;
- `flow[end=1/N]`: FLUX's spacing from t = 1 down to shift(1/N), then 0; target the exact solution at 0;
- `flow[start=train,end=1/N]`: diffusers' use_flow_sigmas grid (DPM-Solver++ and UniPC's own), from
  t = 1 - 1/T; target the exact solution at 0 from that start.

Exact solutions: scipy DOP853 on the exact guided velocity in flow time, rtol = atol = 1e-10. The error
is traj_err's: the mean over samples of the per-sample RMS distance. NFE 5/10/20/40/80 are the budgets
asked; a 2-evaluations-per-step sampler spends 2N - 1 (5, 9, 19, 39, 79: N = 3, 5, 10, 20, 40). Orders are
log(e_a / e_b) / log(N_b / N_a) between consecutive budgets (steps N, not NFE).

    .venv/bin/python bench/bench_flow.py [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import machine, write_section  # noqa: E402

from samplebench.config import conf_dir  # noqa: E402
from samplebench.errors import UsageError  # noqa: E402
from samplebench.metrics.reference import solve_flow_with_floor  # noqa: E402
from samplebench.models.gmm import FlowMixtureModel, MixtureSpec  # noqa: E402
from samplebench.samplers import SAMPLERS  # noqa: E402
from samplebench.samplers.base import CountingDenoiser, guided_denoiser  # noqa: E402
from samplebench.schedules import make_grid  # noqa: E402
from samplebench.seeds import initial_noise  # noqa: E402

TITLE = "## Flow samplers on gmm_flow: error and order (bench/bench_flow.py)"
SCHEDULES = {
    "flow": {"name": "flow"},
    "flow[end=1/N]": {"name": "flow", "end": "1/N"},
    "flow[start=train,end=1/N]": {"name": "flow", "start": "train", "end": "1/N"},
}
SAMPLER_NAMES = [
    "flow_euler",
    "euler",
    "diffusers:flow_euler",
    "flow_heun",
    "diffusers:flow_heun",
    "heun",
    "dpmpp",
    "diffusers:dpmpp",
    "diffusers:dpmpp_3m",
    "unipc",
    "diffusers:unipc",
]
BUDGETS = (5, 10, 20, 40, 80)  # 80 shows where the asymptotic order settles


class Study:
    def __init__(self, samples: int = 32, shift: float = 3.0):
        self.model = FlowMixtureModel(MixtureSpec(shift=shift), torch.device("cpu"))
        idx = list(range(samples))
        self.labels = self.model.conditions(idx, 0)
        self.x_T = initial_noise(0, idx, self.model.sample_shape, torch.float64, self.model.device)
        self._targets: dict[tuple, torch.Tensor] = {}

    def target(self, grid, schedule: dict) -> torch.Tensor:
        s0 = float(grid.sigmas[0])
        s_f = float(grid.sigmas[grid.sigmas > 0][-1])
        floor = schedule.get("end") is None  # the SD3 spacing keeps its last level: converge to the floor
        key = (s0, s_f if floor else None)
        if key not in self._targets:
            end, jump = solve_flow_with_floor(
                self.model, self.x_T, self.labels, 1.0, sigma_start=s0, sigma_floor=s_f
            )
            self._targets[key] = jump if floor else end
        return self._targets[key]

    def error(self, name: str, schedule: dict, nfe: int) -> tuple[int, int, float]:
        """(steps, counted NFE, error) of the sampler at the largest budget <= nfe it can spend."""
        spec = SAMPLERS[name]
        opts = options(name)
        steps = spec.rule(opts, schedule).steps(nfe, name, True)
        grid = make_grid(schedule, self.model.noise_schedule, steps)
        counter = CountingDenoiser(guided_denoiser(self.model, self.labels, 1.0))
        x = self.model.noise_schedule.initial_state(self.x_T, float(grid.sigmas[0]))
        out = spec.run(counter, x, grid, opts, None, None)
        err = ((out - self.target(grid, schedule)) ** 2).mean(1).sqrt().mean().item()
        return steps, counter.calls, err


def options(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    cfg.pop("name")
    return cfg


def orders(rows: list[tuple[int, int, float]]) -> list[float]:
    return [math.log(a[2] / b[2]) / math.log(b[0] / a[0]) for a, b in zip(rows, rows[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--write", type=Path, default=None, help="replace or append the section in this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    study = Study(args.samples)
    lines = [
        TITLE,
        "",
        "Measured on the CPU development machine (2 cores), `model=gmm_flow` (shift 3, float64, "
        f"{args.samples} samples, guidance 1), every sampler through the registry from the same x_T. Error: "
        "the mean per-sample RMS distance to the exact flow-ODE solution from the same start (scipy DOP853 "
        "on the exact velocity, rtol 1e-10); on `flow` (SD3's spacing, which keeps its last level "
        "t_f = shift(shift(1/T)) for every N) to the floor point, the exact solve to t_f then the exact "
        "jump to 0, where every sampler on that grid converges. NFE columns are the budgets asked; "
        "Heun-type samplers spend 2N - 1 (5, 9, 19, 39, 79 for N = 3, 5, 10, 20, 40). Orders: "
        "log(e_a / e_b) / log(N_b / N_a) between consecutive budgets. — : the scheduler cannot run "
        "that spacing on a flow model (one-line error; FlowMatchHeun and DPM-Solver take no list of times).",
        "",
        f"Machine: {machine()}",
        "",
        "| sampler | schedule | NFE 5 | NFE 10 | NFE 20 | NFE 40 | NFE 80 "
        "| order 5→10 | order 10→20 | order 20→40 | order 40→80 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SAMPLER_NAMES:
        for label, schedule in SCHEDULES.items():
            try:
                rows = [study.error(name, schedule, nfe) for nfe in BUDGETS]
            except UsageError:
                lines.append(f"| {name} | {label} | — | — | — | — | — | | | | |")
                continue
            errs = " | ".join(
                f"{e:.2e}" + (f" ({c})" if c != nfe else "")
                for (_, c, e), nfe in zip(rows, BUDGETS, strict=True)
            )
            ords = " | ".join(f"{o:.2f}" for o in orders(rows))
            lines.append(f"| {name} | {label} | {errs} | {ords} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += [
        "",
        "Read: Euler in flow time (flow_euler, diffusers:flow_euler) and EDM's Euler in sigma take the same "
        "steps (identical rows) and converge at order 1. Heun in flow time converges at order 2 (above 2 "
        "before the asymptotic regime on SD3's spacing). EDM's `heun` (the trapezoid in sigma) from t = 1 "
        "is not usable: its first step averages the slope at sigma = 1e8 with the slope at the next level "
        "over an interval of length ~1e8, errors 1e4 to 1e6 at 5 NFE and still above 1 at 80 NFE (its "
        "'order' is the decay of that start-up error); "
        "from t = 1 - 1/T it converges at order 2. DPM-Solver++(2M) and UniPC (native and diffusers, which "
        "agree) from t = 1 take a huge first logSNR step (sigma = 1e8: lambda = -18.4; diffusers' UniPC "
        "moves t = 1 to 1 - 1e-6, lambda = -13.8): the error grows from NFE 5 to 10 and order 2 shows "
        "only from NFE 40 to 80. On the "
        "linear-in-t spacings ending at 1/N they are the best at NFE 10-20, but their asymptotic order "
        "drops to about 1: near t = 0 consecutive levels keep ratios 2, 3/2, ... for every N, so the last "
        "logSNR steps do not shrink, and the error they leave is proportional to the last level ~ 1/N "
        "(DPM-Solver++(3M) likewise, below its order 3). tests/test_flow_convergence.py checks these "
        "orders (and pins the failures) on the same model.",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.write is not None:
        write_section(args.write, TITLE, section)


if __name__ == "__main__":
    main()
