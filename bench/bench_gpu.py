"""Benchmark (not a test): GPU figures in one command, side by side in one process, offline.

Three parts, each a ratio of two things measured in the same run, repeats interleaved, medians,
torch.cuda.synchronize around every timed region, warm-up calls untimed:

1. `samplebench generate` (its native DPM-Solver++(2M), and its wrapper of diffusers' scheduler) against a
   bare diffusers StableDiffusionPipeline loop (DPMSolverMultistepScheduler, output_type="latent") on an
   SD-1.5-shaped model: same NFE, batch, guidance, prompts and initial latents. samplebench's side is timed
   twice: by its own per-call records (shards' batch_seconds, read through metrics.run.timing_row) and by
   an outside wall clock around `generate` (model load excluded).
2. Feature throughput: samplebench's InceptionFeatures against torch-fidelity's own extraction loop and its
   bare FeatureExtractorInceptionV3 forward; DINOv2 (samplebench has no DINOv2 metric yet): torch-fidelity's
   FeatureExtractorDinoV2 against a plain transformers Dinov2Model of the same size.
3. torch.compile: samplebench with model.compile=true against off (skipped with the reason when the
   installed samplebench does not know the key); compile time (the warm-up call) apart from steady state.

No network is needed (a lent GPU machine has none): every network is built at its real size from the
upstream configs and randomly initialised; throughput does not depend on weight values.
`--model-path` takes a real local SD-1.5 folder instead.

    .venv/bin/python bench/bench_gpu.py --write      # on a GPU machine: < 10 min on an H100
    .venv/bin/python bench/bench_gpu.py --smoke      # tiny sizes, CPU, seconds (tests/test_bench_gpu.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # this checkout's samplebench first

from bench_generate import machine  # noqa: E402
from bench_generate import write_section as shared_write_section  # noqa: E402  (the machine line every BENCHMARKS.md figure carries)

SECTION = "GPU benchmarks (bench/bench_gpu.py)"

# --- model configs ------------------------------------------------------------------------------------
# Stable Diffusion 1.5 as published (stable-diffusion-v1-5/stable-diffusion-v1-5 on the hub, also in
# diffusers' docs/source): unet/config.json (859.5M parameters), vae/config.json (83.7M),
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower, 123.1M) and
# scheduler/scheduler_config.json. Keys left out equal the diffusers / transformers defaults.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    center_input_sample=False,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# --smoke: the same classes at toy sizes (64 px images), so the whole script runs on a CPU in seconds.
TINY_UNET = SD15_UNET | dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
)
TINY_VAE = SD15_VAE | dict(
    block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64
)
TINY_TEXT = SD15_TEXT | dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)
# DINOv2 ViT sizes (facebookresearch/dinov2 hubconf: dinov2_vits14 / dinov2_vitl14; patch 14, 518 px
# position grid, layer-scale) as transformers' Dinov2Config fields, and timm's name for the same network.
DINO: dict[str, tuple[dict[str, int], str]] = {
    "dinov2-vit-s-14": (
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
        "vit_small_patch14_dinov2",
    ),
    "dinov2-vit-l-14": (
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        "vit_large_patch14_dinov2",
    ),
}
# The diffusers scheduler options that equal samplebench's `diffusers:dpmpp schedule=karras`
# (bench/bench_vs_diffusers.py, which checks the same pairing on the tiny model).
DPMPP_KARRAS = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    timestep_spacing="linspace",
    use_karras_sigmas=True,
    final_sigmas_type="zero",
    lower_order_final=True,
)


@dataclass(frozen=True)
class Sizes:
    """What one run measures; FULL is sized to finish in well under 10 minutes on one H100."""

    sd: str  # "sd15" (real size) or "tiny"
    images: int  # per samplebench call and per bare-loop call
    batch: int
    nfe: int
    guidance: float
    repeats: int
    feature_images: int
    feature_px: int
    feature_batch: int
    dino: str
    dino_images: int
    feature_repeats: int
    samplers: tuple[str, ...] = ("dpmpp", "diffusers:dpmpp")
    warmup: bool = True  # an untimed round of every side first (off in --smoke: its timings mean nothing)


FULL = Sizes("sd15", 16, 8, 20, 7.5, 3, 2048, 299, 64, "dinov2-vit-l-14", 1024, 3)
SMOKE = Sizes("tiny", 2, 2, 4, 7.5, 1, 1, 64, 1, "dinov2-vit-s-14", 1, 1, ("dpmpp",), warmup=False)


@dataclass
class Clock:
    """Elapsed time of the whole run and the budget check that skips what no longer fits."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, what: str, needs_s: float = 0.0) -> bool:
        """False (and a note for the section) when `what` would run past the budget."""
        if self.elapsed() + needs_s <= self.budget_s:
            return True
        self.notes.append(
            f"{what}: skipped, {self.elapsed():.0f} s elapsed + about {needs_s:.0f} s needed > budget "
            f"{self.budget_s:.0f} s (--budget-s)"
        )
        log(self, self.notes[-1])
        return False


def log(clock: Clock, msg: str) -> None:
    print(f"[{clock.elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """No progress bars or info logs from diffusers / transformers (stdout carries the section)."""
    import diffusers.utils.logging as dlog
    import transformers

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of fn(), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    clock: Clock,
    what: str,
    warmup: bool,
) -> dict[str, list[float]]:
    """Each side once untimed (warm-up), then `repeats` rounds in rotating order (a drifting load moves
    every side alike). Rounds stop early, after the first, when the budget is spent."""
    names = list(sides)
    for name in names if warmup else []:
        sides[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        if r and not clock.fits(f"{what}: repeats {r + 1}-{repeats}"):
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timed(device, sides[name])[0])
    return times


def rounds(n: int, warmup: bool) -> str:
    after = "after an untimed one" if warmup else "no untimed round first"
    return f"{n} round{'s' * (n != 1)} in rotating order ({after}), medians"


def fmt_times(xs: list[float]) -> str:
    return ", ".join(f"{x:.3g}" for x in xs)


# --- part 1: samplebench generate vs a bare diffusers loop --------------------------------------------


def build_sd(folder: Path, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Path:
    """A randomly initialised SD-1.5-shaped StableDiffusionPipeline saved as a diffusers folder.

    The networks are made on `device` (seconds for the 1.07B parameters on a GPU, about a minute on a
    CPU) and saved in `dtype`. The tokenizer is the tests' small CLIP BPE vocabulary
    (tests/tiny_models.py): prompts still pad to 77 tokens, so the text encoder's cost is the real one.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import write_tiny_clip_vocab
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    unet_cfg, vae_cfg, text_cfg = (
        (SD15_UNET, SD15_VAE, SD15_TEXT) if sizes.sd == "sd15" else (TINY_UNET, TINY_VAE, TINY_TEXT)
    )
    vocab = folder.parent / f"{folder.name}-vocab"
    write_tiny_clip_vocab(vocab)
    tokenizer = CLIPTokenizer.from_pretrained(vocab, model_max_length=77, pad_token="<|endoftext|>")
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if sizes.sd != "sd15":
        text_cfg = text_cfg | {"vocab_size": len(tokenizer)}
    torch.manual_seed(0)

    def make(where: torch.device) -> tuple[Any, Any, Any]:
        with torch.device(where):
            return (
                UNet2DConditionModel(**unet_cfg),
                AutoencoderKL(**vae_cfg),
                CLIPTextModel(CLIPTextConfig(**text_cfg, **ids)),
            )

    try:
        unet, vae, text = make(device)
    except Exception as e:  # noqa: BLE001 - a library that cannot initialise on the GPU: the CPU is slower, not wrong
        print(f"building on {device} failed ({e!r}); building on the CPU", file=sys.stderr)
        unet, vae, text = make(torch.device("cpu"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def load_bare(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline a diffusers user loads, with DPM-Solver++(2M) Karras as its scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **DPMPP_KARRAS)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def bare_loop(pipe: Any, sizes: Sizes, device: torch.device) -> Any:
    """Batch by batch: samplebench's prompts and initial latents for samples 0..images-1, latents out."""
    from samplebench.prompts import BUILTIN_PROMPTS
    from samplebench.seeds import initial_noise

    c = pipe.unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    out = []
    for start in range(0, sizes.images, sizes.batch):
        idx = list(range(start, min(start + sizes.batch, sizes.images)))
        latents = initial_noise(0, idx, shape, torch.float32, device).to(pipe.unet.dtype)
        out.append(
            pipe(
                prompt=[BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in idx],
                num_inference_steps=sizes.nfe,
                guidance_scale=sizes.guidance,
                latents=latents,
                output_type="latent",
            ).images
        )
    return out


@dataclass(frozen=True)
class SbRun:
    """One `samplebench generate` call: outside wall clock and the tool's own records of its cell."""

    wall_s: float  # around generate(), model load excluded
    load_s: float
    row: dict[str, Any]  # metrics.run.timing_row of the cell


def sb_overrides(
    path: Path, sizes: Sizes, sampler: str, device: torch.device, results: Path, run: str
) -> list[str]:
    return [
        "model=sd15",
        f"model.path={path}",
        f"sampler={sampler}",
        "schedule=karras",
        f"nfe={sizes.nfe}",
        f"guidance={sizes.guidance}",
        f"num_images={sizes.images}",
        f"batch_size={sizes.batch}",
        f"shard_size={sizes.images}",
        f"results_dir={results}",
        f"run={run}",
        f"device={device}",
    ]


def sb_generate(overrides: list[str], device: torch.device) -> SbRun:
    """plan + generate as a user of the Python API runs them, then the cell's timing row."""
    from rich.console import Console

    from samplebench import store
    from samplebench.config import plan
    from samplebench.generate import generate
    from samplebench.metrics.run import timing_row

    cells = plan(overrides)
    wall, summary = timed(device, lambda: generate(cells, console=Console(stderr=True, quiet=True)))
    load = sum(summary.model_load_seconds.values())
    (cell,) = store.find_cells(summary.run_dir)
    return SbRun(wall - load, load, timing_row(cell))


def part_generate(
    path: Path, sizes: Sizes, device: torch.device, dtype: torch.dtype, tmp: Path, clock: Clock
) -> list[str]:
    """samplebench's samplers vs the bare loop; runs alternate, the first of each side untimed."""
    pipe = load_bare(path, device, dtype)
    counter = iter(range(10**6))
    # Equal work on both sides for the wall clock: no warm-up call and no timing-only repeats inside
    # samplebench (the process is warm from the untimed first round); its per-call records still
    # time every batch.
    extra = ["timing.warmup=false", "timing.repeats=1"]
    runs: dict[str, list[SbRun]] = {s: [] for s in sizes.samplers}

    def sb_side(sampler: str) -> Callable[[], None]:
        def call() -> None:
            ov = sb_overrides(path, sizes, sampler, device, tmp / "results", f"r{next(counter)}")
            runs[sampler].append(sb_generate([*ov, *extra], device))

        return call

    sides: dict[str, Callable[[], Any]] = {f"sb:{s}": sb_side(s) for s in sizes.samplers}
    sides["bare"] = lambda: bare_loop(pipe, sizes, device)
    times = interleaved(sides, sizes.repeats, device, clock, "part 1", sizes.warmup)
    for s in sizes.samplers:
        runs[s] = runs[s][int(sizes.warmup) :]  # the untimed warm-up round
    bare = statistics.median(times["bare"])
    n = sizes.images
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    lines = [
        f"### samplebench generate vs a bare diffusers loop ({'SD-1.5' if sizes.sd == 'sd15' else 'tiny SD'}"
        f"-shaped, {res} px)",
        "",
        f"{n} images per call in batches of {sizes.batch}, NFE {sizes.nfe}, guidance {sizes.guidance} "
        f"(one UNet call on a batch of {2 * sizes.batch} per step), schedule karras, network in {dtype}; "
        f"builtin prompts and samplebench's initial latents on both sides; "
        f"{rounds(sizes.repeats, sizes.warmup)}. samplebench: `plan([model=sd15 model.path=<folder> "
        "sampler=... timing.warmup=false ...])` then `generate(cells)` (its wall clock includes prompt "
        "encoding, VAE decoding in float32 (force_upcast), shard and preview writing; model load "
        "excluded); *recorded* is its own median per-call sampling time (shards' batch_seconds, "
        "metrics.run.timing_row: sampler loop only, synchronised). Bare: `StableDiffusionPipeline("
        "prompt=..., latents=..., output_type='latent')` with DPMSolverMultistepScheduler "
        "(DPM-Solver++(2M), Karras sigmas), wall clock (includes its prompt encoding, no decoding).",
        "",
        "| side | images/s | s/image | recorded decode s/image | wall s per call (each round) |",
        "|---|---:|---:|---:|---|",
    ]
    for s in sizes.samplers:
        rs = runs[s]
        wall = statistics.median(r.wall_s for r in rs)
        rec = statistics.median(r.row["sec_per_image_sampling"] for r in rs)
        dec = statistics.median(r.row["sec_per_image_decode"] for r in rs)
        each = fmt_times([r.wall_s for r in rs])
        lines.append(
            f"| samplebench {s}, recorded (sampling) | {1 / rec:.3f} | {rec:.4g} | {dec:.4g} | {each} |"
        )
        lines.append(
            f"| samplebench {s}, wall clock | {n / wall:.3f} | {wall / n:.4g} | {dec:.4g} | {each} |"
        )
    each = fmt_times(times["bare"])
    lines.append(f"| bare diffusers loop, wall clock | {n / bare:.3f} | {bare / n:.4g} | 0 | {each} |")
    lines.append("")
    for s in sizes.samplers:
        rs = runs[s]
        wall = statistics.median(r.wall_s for r in rs)
        rec = statistics.median(r.row["sec_per_image_sampling"] for r in rs)
        dec = statistics.median(r.row["sec_per_image_decode"] for r in rs)
        nfe = {int(r.row["nfe_actual"]) for r in rs}
        lines.append(
            f"- samplebench {s} / bare diffusers, time per image: **{rec * n / bare:.3f}** recorded "
            f"sampling, {wall / bare:.3f} wall clock, {(wall - dec * n) / bare:.3f} wall clock less its "
            f"recorded decoding (NFE counted {sorted(nfe)}; model load "
            f"{statistics.median(r.load_s for r in rs):.1f} s per call, not counted)"
        )
    return lines


# --- part 3: torch.compile -------------------------------------------------------------------------


def part_compile(
    path: Path, sizes: Sizes, device: torch.device, tmp: Path, clock: Clock, mode: str | None, smoke: bool
) -> list[str]:
    """samplebench with model.compile=true vs off, one generate call each; the compile lands in the
    first (warm-up) call or the load, so it is reported apart from the steady per-call time."""
    from samplebench.config import plan
    from samplebench.errors import UsageError

    head = ["### torch.compile in samplebench (model.compile)", ""]
    sampler = sizes.samplers[0]
    switch = ["model.compile=true"] + ([f"model.compile_mode={mode}"] if mode else [])
    timing = []
    if smoke:  # dynamo's tracing without inductor's code generation (minutes on a CPU even for the tiny UNet)
        switch.append("model.compile_backend=eager")
        timing = ["timing.repeats=1"]  # the warm-up call and one timed call

    def overrides(run: str, extra: list[str]) -> list[str]:
        return [*sb_overrides(path, sizes, sampler, device, tmp / "results", run), *timing, *extra]

    try:
        plan(overrides("compile-check", switch))
    except UsageError as e:
        return [*head, f"Skipped: the installed samplebench does not take `{' '.join(switch)}` ({e})."]
    if not clock.fits("part 3 (compile)", needs_s=0 if smoke else 180):
        return [*head, "Skipped: over the time budget (see the budget notes)."]
    off = sb_generate(overrides("compile-off", []), device)
    log(clock, f"part 3: compile off done; now {' '.join(switch)}")
    on = sb_generate(overrides("compile-on", switch), device)
    lines = [
        *head,
        f"`sampler={sampler}`, {sizes.images} images in batches of {sizes.batch}, NFE {sizes.nfe}, one "
        f"`generate` call each, off first, then `{' '.join(switch)}`, samplebench's default timing"
        f"{''.join(' ' + t for t in timing)} (an untimed warm-up call, then timed calls). *Warm-up call* is "
        "samplebench's record of that first call (where a lazy compile lands); *steady* is its median "
        "per-call sampling time over the timed calls (metrics.run.timing_row); *load* is its model load "
        "(where an eager compile would land).",
        "",
        "| model.compile | warm-up call s | load s | steady s/image | steady images/s "
        "| generate wall s (load excluded) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("off", off), ("on", on)):
        rec = r.row["sec_per_image_sampling"]
        lines.append(
            f"| {name} | {r.row['warmup_seconds']:.3f} | {r.load_s:.2f} | {rec:.4g} | {1 / rec:.3f} "
            f"| {r.wall_s:.2f} |"
        )
    t_off, t_on = off.row["sec_per_image_sampling"], on.row["sec_per_image_sampling"]
    overhead = (on.row["warmup_seconds"] + on.load_s) - (off.row["warmup_seconds"] + off.load_s)
    payback = f", paid back after about {overhead / (t_off - t_on):.0f} images" if t_on < t_off else ""
    lines += [
        "",
        f"- steady-state speed-up with compile: **{t_off / t_on:.3f}x**; compile cost (warm-up call + load, "
        f"on minus off): **{overhead:.1f} s**{payback}",
    ]
    return lines


# --- part 2: feature extractors --------------------------------------------------------------------


def make_images(n: int, px: int) -> np.ndarray:
    """uint8 (n, px, px, 3): random pixels (content does not change a network's speed)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, generator=g).numpy()


class ImageSet(torch.utils.data.Dataset):
    """The images as torch-fidelity's datasets give them: uint8 CHW tensors."""

    def __init__(self, images: np.ndarray):
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].contiguous()


def forward_loop(
    net: Callable[[torch.Tensor], Any], images: np.ndarray, batch: int, device: torch.device
) -> None:
    """The plainest feed: uint8 NCHW batches to the device, forward, features back to the host."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out = net(x[s : s + batch].contiguous().to(device))
            for t in out if isinstance(out, tuple) else (out,):
                t.cpu()


@contextlib.contextmanager
def local_dinov2_hub(folder: Path, arch: str) -> Iterator[None]:
    """torch-fidelity builds DINOv2 with torch.hub.load("facebookresearch/dinov2", name), a GitHub
    download. Here that one call is answered by torch.hub.load(folder, name, source="local") from a
    hubconf.py that builds timm's port of the same network (timm.models.vision_transformer
    `vit_*_patch14_dinov2`: DinoVisionTransformer's layer-scale blocks, position embeddings interpolated
    at each forward, SDPA attention as upstream main), random weights, CLS token after the final norm as
    upstream's forward returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(
        'dependencies = ["torch", "timm"]\n\n\n'
        "def _vit(arch):\n"
        "    import timm\n\n"
        "    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)\n\n\n"
        + "".join(
            f"def dinov2_{n}(**kwargs):\n    return _vit({a!r})\n\n\n"
            for n, a in (("vits14", DINO["dinov2-vit-s-14"][1]), ("vitl14", DINO["dinov2-vit-l-14"][1]))
        )
    )
    real = torch.hub.load

    def load(repo_or_dir: str, model: str, *args: Any, **kwargs: Any) -> Any:
        if repo_or_dir == "facebookresearch/dinov2":
            kwargs.pop("source", None)
            return real(str(folder), model, *args, source="local", **kwargs)
        return real(repo_or_dir, model, *args, **kwargs)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = real


def part_features(sizes: Sizes, device: torch.device, tmp: Path, clock: Clock) -> list[str]:
    """Inception: samplebench vs torch-fidelity (its loop, its bare forward); DINOv2: torch-fidelity vs
    transformers."""
    import torch_fidelity
    import torchvision
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.utils import get_featuresdict_from_dataset
    from transformers import Dinov2Config, Dinov2Model

    from samplebench.metrics.inception import (
        EXTRACTOR_NAME,
        FEATURES,
        WEIGHTS_FILENAME,
        InceptionFeatures,
        isc_from_logits,
        save_random_weights,
    )

    log(clock, "part 2: random Inception weights in torch-fidelity's format")
    images = make_images(sizes.feature_images, sizes.feature_px)
    n, bs = len(images), sizes.feature_batch
    weights = save_random_weights(tmp / WEIGHTS_FILENAME, seed=0)
    ours = InceptionFeatures("legacy", weights_path=weights, device=device, batch_size=bs)
    tf_net = FeatureExtractorInceptionV3(
        EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=str(weights)
    )
    tf_net = tf_net.to(device).eval()
    dataset = ImageSet(images)
    cuda = device.type == "cuda"
    isc: dict[str, float] = {}
    splits = min(10, n)  # IS over 10 splits (both libraries' default) where there are 10 images

    def sb_inception() -> None:
        isc["samplebench"] = isc_from_logits(ours(images)["logits"], splits)[0]

    def tf_loop() -> None:
        # torch-fidelity's own extraction loop (DataLoader with its default workers, pinned memory) + IS
        with warnings.catch_warnings():  # its 4 workers on a machine with fewer cores: a warning each call
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            feats = get_featuresdict_from_dataset(dataset, tf_net, bs, cuda, False, False)
        out = isc_features_to_metric(feats["logits_unbiased"], splits=splits)
        isc["torch-fidelity"] = float(out["inception_score_mean"])

    inception = {
        "samplebench InceptionFeatures (channels-last) + IS": sb_inception,
        "torch-fidelity get_featuresdict_from_dataset + IS": tf_loop,
        "torch-fidelity FeatureExtractorInceptionV3, plain forward loop": lambda: forward_loop(
            tf_net, images, bs, device
        ),
    }
    log(clock, f"part 2: Inception, {n} image(s) at {sizes.feature_px} px")
    t_inc = interleaved(inception, sizes.feature_repeats, device, clock, "part 2 (Inception)", sizes.warmup)

    lines = [
        "### Feature extraction throughput",
        "",
        f"{n} random uint8 image{'s' * (n != 1)} at {sizes.feature_px} px held in memory, batch {bs}, "
        f"float32 networks (torch defaults: cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
        f"{torch.backends.cuda.matmul.allow_tf32}), {rounds(sizes.feature_repeats, sizes.warmup)}; "
        "network construction not timed. Inception: torch-fidelity's "
        "FeatureExtractorInceptionV3 (inception-v3-compat, TF1 bilinear resize to 299 inside) loaded from a "
        "random state dict in its upstream file format (samplebench.metrics.inception.save_random_weights); "
        "samplebench's InceptionFeatures holds the same network in channels-last layout. IS is computed from "
        "the logits on the first two rows (same weights, so equal up to float rounding).",
        "",
        "| extractor | implementation | images | images/s | s per round (each round) |",
        "|---|---|---:|---:|---|",
    ]
    for name, ts in t_inc.items():
        lines.append(f"| Inception-v3 | {name} | {n} | {n / statistics.median(ts):.1f} | {fmt_times(ts)} |")

    dino_lines: list[str] = []
    if clock.fits("part 2 (DINOv2)"):
        cfg, arch = DINO[sizes.dino]
        torch.manual_seed(0)
        with local_dinov2_hub(tmp / "dinov2-hub", arch):
            tf_dino = FeatureExtractorDinoV2(sizes.dino, ["dinov2"]).to(device).eval()
        hf = Dinov2Model(Dinov2Config(**cfg, image_size=518, patch_size=14, attn_implementation="sdpa"))
        hf = hf.to(device).eval()
        size = FeatureExtractorDinoV2.INPUT_IMAGE_SIZE

        def hf_forward(x: torch.Tensor) -> torch.Tensor:
            # torch-fidelity's preprocessing (TF1 bilinear resize to 224, ImageNet normalisation), then the
            # transformers network's pooled output (the CLS token after the final layer norm)
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(size, size), align_corners=False)
            mean = tuple(255 * m for m in (0.485, 0.456, 0.406))
            std = tuple(255 * s for s in (0.229, 0.224, 0.225))
            x = torchvision.transforms.functional.normalize(x, mean, std)
            return hf(pixel_values=x).pooler_output

        sub = images[: sizes.dino_images]
        params = {
            "tf": sum(p.numel() for p in tf_dino.parameters()) / 1e6,
            "hf": sum(p.numel() for p in hf.parameters()) / 1e6,
        }
        dino = {
            f"torch-fidelity FeatureExtractorDinoV2 ({arch}, timm, {params['tf']:.1f}M)": lambda: (
                forward_loop(tf_dino, sub, bs, device)
            ),
            f"transformers Dinov2Model (sdpa, {params['hf']:.1f}M), same preprocessing": lambda: forward_loop(
                hf_forward, sub, bs, device
            ),
        }
        log(clock, f"part 2: DINOv2 {sizes.dino}, {len(sub)} image(s)")
        t_dino = interleaved(dino, sizes.feature_repeats, device, clock, "part 2 (DINOv2)", sizes.warmup)
        for name, ts in t_dino.items():
            dino_lines.append(
                f"| DINOv2 {sizes.dino.removeprefix('dinov2-')} | {name} | {len(sub)} | "
                f"{len(sub) / statistics.median(ts):.1f} | {fmt_times(ts)} |"
            )
    lines += dino_lines
    ours_s = statistics.median(t_inc[next(iter(inception))])
    lines.append("")
    for name in list(inception)[1:]:
        lines.append(
            f"- Inception throughput, samplebench / {name}: "
            f"**{statistics.median(t_inc[name]) / ours_s:.3f}x**"
        )
    if dino_lines:
        a, b = (statistics.median(ts) for ts in t_dino.values())
        lines.append(f"- DINOv2 throughput, transformers / torch-fidelity: **{a / b:.3f}x**")
    lines.append(
        f"- Inception Score on the same images: samplebench {isc['samplebench']:.6f}, torch-fidelity "
        f"{isc['torch-fidelity']:.6f}"
    )
    if dino_lines:
        lines.append(
            f"- DINOv2 sides: torch-fidelity {torch_fidelity.__version__}'s FeatureExtractorDinoV2 (its TF1 "
            "resize to 224 and normalisation, then the network torch.hub.load returns) with that "
            "torch.hub.load answered offline by a local hubconf building timm's port of "
            f"facebookresearch/dinov2 (`{arch}`, dynamic image size); against transformers' Dinov2Model "
            "at the same size (SDPA attention) behind the same preprocessing. Both random-initialised; "
            "samplebench has no DINOv2 metric, so this is the network a samplebench DINOv2 metric could use "
            "against torch-fidelity's."
        )
    return lines


# --- the section ---------------------------------------------------------------------------------------


PART_TITLES = {"generate": "part 1", "features": "part 2", "compile": "part 3"}


def guarded(part: str, parts: list[str], clock: Clock, run: Callable[[], list[str]]) -> list[str]:
    """A part's lines (and a blank line), or nothing when not asked for or over budget, or a FAILED line
    (traceback on stderr) when it raised."""
    what = f"{PART_TITLES[part]} ({part})"
    if part not in parts or not clock.fits(what):
        return []
    log(clock, what)
    try:
        lines = run()
    except Exception as e:  # noqa: BLE001 - reported in the section; main() exits 1
        traceback.print_exc()
        clock.failures.append(f"{what} FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return [f"**{clock.failures[-1]}**", ""]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [*lines, ""]


def versions() -> str:
    import diffusers
    import timm
    import torch_fidelity
    import transformers

    cuda = (
        f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if torch.version.cuda else ""
    )
    return (
        f"torch {torch.__version__}{cuda}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}, torch-fidelity {torch_fidelity.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), no GPU"


def write_section(path: Path, section: str) -> None:
    """This benchmark's section of BENCHMARKS.md, replaced in place or appended (bench_generate)."""
    shared_write_section(path, f"## {SECTION}", section)


def pick_device(name: str, smoke: bool) -> tuple[torch.device, bool]:
    """(device, smoke): without CUDA a cuda request falls back to the CPU at --smoke sizes, loudly."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"--device {name}: CUDA is not available (torch {torch.__version__}, "
            f"cuda {torch.version.cuda}); falling back to the CPU at --smoke sizes. These are not GPU "
            "figures, and BENCHMARKS.md is not written.",
            file=sys.stderr,
        )
        return torch.device("cpu"), True
    return device, smoke


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda", help="cuda (default; CPU at --smoke sizes without CUDA) or cpu"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU (tests the script)")
    ap.add_argument(
        "--model-path", type=Path, help="a local SD-1.5 diffusers folder instead of random weights"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file whose section is replaced")
    ap.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the section to --out (default: on a GPU, not with --smoke)",
    )
    ap.add_argument("--parts", default="generate,features,compile", help="comma list of the parts to run")
    ap.add_argument("--images", type=int, help="images per generate call")
    ap.add_argument("--batch", type=int, help="generation batch size")
    ap.add_argument("--nfe", type=int)
    ap.add_argument("--repeats", type=int, help="timed rounds of every side")
    ap.add_argument("--compile-mode", help="also pass model.compile_mode=<this> (default: samplebench's)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip what would end past this (seconds)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - {"generate", "features", "compile"}):
        ap.error(f"--parts: unknown {', '.join(unknown)}; choose from generate, features, compile")
    device, smoke = pick_device(args.device, args.smoke)
    fell_back = smoke and not args.smoke
    sizes = SMOKE if smoke else FULL
    picked = {
        k: v
        for k, v in dict(images=args.images, batch=args.batch, nfe=args.nfe, repeats=args.repeats).items()
        if v
    }
    sizes = replace(sizes, **picked)
    write = args.write if args.write is not None else (device.type == "cuda" and not smoke)
    if write and fell_back:  # GPU figures were asked for; CPU smoke figures must not replace them
        print(
            f"not writing {args.out}: no GPU (run with --smoke --write to write smoke figures)",
            file=sys.stderr,
        )
        write = False
    clock = Clock(args.budget_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # torch-fidelity's loop moves batches with .cuda(): the current device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    log(clock, f"{device_name(device)}; {'smoke' if smoke else 'full'} sizes; parts {', '.join(parts)}")

    body: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp_name:
        tmp = Path(tmp_name)
        path = args.model_path
        build_s = 0.0
        if {"generate", "compile"} & set(parts) and path is None:
            log(clock, f"building the random {sizes.sd} pipeline")
            try:
                build_s, path = timed(device, lambda: build_sd(tmp / "sd", sizes, device, dtype))
            except Exception as e:  # noqa: BLE001 - the feature part needs no pipeline: it still runs
                traceback.print_exc()
                clock.failures.append(f"building the pipeline FAILED: {type(e).__name__}: {e}"[:300])
                body += [f"**{clock.failures[-1]}** (parts generate and compile not run)", ""]
                parts = [p for p in parts if p == "features"]
        # Features first: a samplebench run may switch global flags (TF32) that the extractors would inherit.
        # A part that fails is reported in the section and the others still run: a lent GPU is one try.
        feat = guarded("features", parts, clock, lambda: part_features(sizes, device, tmp, clock))
        body += guarded(
            "generate", parts, clock, lambda: part_generate(path, sizes, device, dtype, tmp, clock)
        )
        body += feat
        compile_mode = args.compile_mode
        body += guarded(
            "compile",
            parts,
            clock,
            lambda: part_compile(path, sizes, device, tmp, clock, compile_mode, smoke),
        )

    model = (
        f"`--model-path {args.model_path}`"
        if args.model_path
        else f"random {'SD-1.5' if sizes.sd == 'sd15' else 'tiny SD'} weights built from configs in "
        f"{build_s:.0f} s (UNet, VAE, CLIP text encoder at {'real' if sizes.sd == 'sd15' else 'toy'} size; "
        "tokenizer: the tests' small BPE vocabulary)"
    )
    head = [
        f"## {SECTION}",
        "",
        f"Measured {datetime.date.today().isoformat()} on **{device_name(device)}** by "
        f"`.venv/bin/python bench/bench_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" in {clock.elapsed():.0f} s{' (SMOKE sizes: the figures say nothing about speed)' * smoke}.",
        "",
        f"Machine: {machine()}.",
        f"Versions: {versions()}.",
        f"Model: {model}. Throughput does not depend on the weights' values.",
        "",
    ]
    notes = [f"- {n}" for n in clock.notes]
    section = "\n".join(head + body + (["Budget notes:", *notes, ""] if notes else []))
    print(section)
    if write:
        write_section(args.out, section)
        log(clock, f"wrote the section '{SECTION}' to {args.out}")
    log(clock, "done" if not clock.failures else f"done, with failures: {'; '.join(clock.failures)}")
    return 1 if clock.failures else 0


if __name__ == "__main__":
    sys.exit(main())
