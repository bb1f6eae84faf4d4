"""Image metrics for a cell: FID, KID, IS, precision/recall (torch-fidelity's Inception port, or
clean-fid's resize), CLIP score (open_clip), ImageReward, and traj_mse.

Features are extracted shard by shard and cached per shard, keyed by the shard's image content
and the extractor's protocol, so memory stays flat in the number of images and a second pass,
more images or another metric recompute nothing already done. Reference statistics are cached
the same way, keyed by the reference images and the protocol. Cache files carry a checksum of their
arrays (samplebench.cache): a damaged or altered one is named on stderr and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samplebench import cache, store
from samplebench.errors import UsageError, brief
from samplebench.metrics import stats
from samplebench.metrics.names import IMAGE

IMAGE_METRICS = IMAGE
NEEDS_REF = ("fid", "kid", "precision", "recall")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shard_content_key(path: Path) -> str:
    """A content key for a shard's images without reading them: the zip member's CRC-32 and size."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("images.npy")
            return f"{info.CRC:08x}-{info.file_size}"
    except KeyError as e:
        raise UsageError(
            f"shard {path} holds no images (a run of the analytic model?); image metrics need a run of an "
            "image model or an image folder"
        ) from e
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(
            f"shard {path} is corrupt or truncated ({e}); delete it and re-run to regenerate it"
        ) from e


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.atomic_write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class Reference:
    """Reference statistics (and features when available) with what made them."""

    source: str
    content_hash: str
    protocol: dict[str, str]
    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None


@dataclass
class ImageContext:
    """Extractors and caches shared by every cell of a metrics pass (each built once, lazily)."""

    cfg: dict[str, Any]
    cache_root: Path
    device: str = "cpu"
    _inception: Any = None
    _clip: Any = None
    _reward: Any = None
    _reference: Reference | None = None
    models: dict[str, Any] = field(default_factory=dict)
    recomputed: int = 0  # feature extractions actually run in this pass (0 on a fully cached pass)

    def sub(self, key: str) -> dict[str, Any]:
        return dict(self.cfg.get(key) or {})

    def inception(self) -> Any:
        if self._inception is None:
            from samplebench.metrics.inception import InceptionFeatures

            self._inception = InceptionFeatures(
                mode=self.sub("fid").get("mode", "legacy"),
                weights_path=self.cfg.get("inception_weights"),
                device=self.device,
                batch_size=int(self.cfg.get("batch_size", 64)),
            )
        return self._inception

    def clip(self) -> Any:
        if self._clip is None:
            from samplebench.metrics.clip_score import ClipScorer

            c = self.sub("clip")
            self._clip = ClipScorer(
                model=c.get("model", "ViT-L-14"),
                pretrained=c.get("pretrained", "openai"),
                model_config=c.get("model_config"),
                device=self.device,
                batch_size=int(self.cfg.get("batch_size", 64)),
            )
        return self._clip

    def reward(self) -> Any:
        if self._reward is None:
            from samplebench.metrics.image_reward import ImageRewardScorer

            c = self.sub("image_reward")
            if not c.get("checkpoint"):
                raise UsageError(
                    "image_reward needs the official checkpoint: download ImageReward.pt where there "
                    "is network and set metrics.image_reward.checkpoint=<path>"
                )
            keys = (
                "med_config",
                "tokenizer",
                "vit",
                "image_size",
                "vit_width",
                "vit_depth",
                "vit_heads",
                "patch_size",
            )
            kwargs = {k: c[k] for k in keys if c.get(k) is not None}
            self._reward = ImageRewardScorer(
                c["checkpoint"], device=self.device, batch_size=int(self.cfg.get("batch_size", 16)), **kwargs
            )
        return self._reward

    # -- cached per-shard quantities ---------------------------------------------------------
    def _cached(
        self, kind: str, fingerprint: str, key: str, compute, keys: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """The cached arrays `keys`, or compute()'s saved with a checksum when there are none to trust
        (cache.load names a damaged or altered file on stderr)."""
        path = self.cache_root / "features" / kind / fingerprint / f"{key}.npz"
        found = cache.load(path, keys)
        if found is not None:
            return found
        out = compute()
        self.recomputed += 1
        cache.save(path, **out)
        return out

    def inception_features(self, shard: Path) -> dict[str, np.ndarray]:
        ext = self.inception()
        return self._cached(
            "inception",
            ext.fingerprint(),
            shard_content_key(shard),
            lambda: {
                k: v.astype(np.float32)
                for k, v in ext(store.read_shard(shard, ("images",))["images"]).items()
            },
            ("pool", "logits"),
        )

    def clip_cosines(self, shard: Path) -> np.ndarray:
        scorer = self.clip()
        data = store.read_shard(shard, ("prompts",))
        key = _digest(shard_content_key(shard), list(data["prompts"]))
        fp = _digest(scorer.protocol)
        return self._cached(
            "clip",
            fp,
            key,
            lambda: {
                "cos": scorer.cosine(store.read_shard(shard, ("images",))["images"], list(data["prompts"]))
            },
            ("cos",),
        )["cos"]

    def rewards(self, shard: Path) -> np.ndarray:
        scorer = self.reward()
        data = store.read_shard(shard, ("prompts",))
        key = _digest(shard_content_key(shard), list(data["prompts"]))
        return self._cached(
            "image_reward",
            _digest(scorer.protocol),
            key,
            lambda: {"reward": scorer(store.read_shard(shard, ("images",))["images"], list(data["prompts"]))},
            ("reward",),
        )["reward"]

    # -- reference statistics ------------------------------------------------------------------
    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = load_reference(self, self.cfg.get("ref"))
        return self._reference


def _folder_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:24]


_REF_FIX = "recompute it from the reference images, or point metrics.ref at them"


def _read_reference_npz(path: Path, ref: str, dim: int) -> dict[str, Any]:
    """mu, sigma, pool (or None) and the recorded protocol (or None) of a reference .npz, each checked:
    anything unreadable, missing, misshapen or non-finite is a one-line UsageError naming the file."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - zip, zlib, pickle-refused and OS errors: not a readable .npz
        raise UsageError(
            f"metrics.ref={ref} is not a readable .npz (corrupt, truncated or another format: {brief(e)}); "
            f"{_REF_FIX}"
        ) from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UsageError(f"metrics.ref={ref} holds a single array, not mu and sigma; {_REF_FIX}")
    try:
        with z:
            arrays = {k: z[k] for k in ("mu", "sigma", "pool", "protocol") if k in z.files}
    except Exception as e:  # noqa: BLE001 - a member that does not decompress or parse
        raise UsageError(f"metrics.ref={ref} is corrupt or truncated ({brief(e)}); {_REF_FIX}") from e

    def bad(what: str) -> UsageError:
        return UsageError(f"metrics.ref={ref}: {what}; {_REF_FIX}")

    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise bad(f"has no {' and '.join(missing)} array{'s' if len(missing) > 1 else ''}")
    mu, sigma, pool = arrays["mu"], arrays["sigma"], arrays.get("pool")
    for name, a in (("mu", mu), ("sigma", sigma), ("pool", pool)):
        if a is not None and a.dtype.kind not in "fiu":
            raise bad(f"{name} holds {a.dtype} values, not real numbers")
    if mu.ndim != 1:
        raise bad(f"mu has shape {mu.shape}; it must be 1-d (the mean of {dim} Inception features)")
    if mu.size == 0 or sigma.size == 0:
        raise bad(f"mu and sigma are empty (shapes {mu.shape} and {sigma.shape})")
    if sigma.shape != (len(mu), len(mu)):
        raise bad(
            f"sigma has shape {sigma.shape}; with mu of length {len(mu)} it must be {(len(mu), len(mu))}"
        )
    if len(mu) != dim:
        raise bad(f"mu and sigma have {len(mu)} features, but Inception's pool features have {dim}")
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise bad(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf)")
    if pool is not None:
        if pool.ndim != 2 or pool.shape[1] != dim or len(pool) == 0:
            raise bad(f"pool has shape {pool.shape}; it must be (N, {dim}), N >= 1 reference images")
        if not np.isfinite(pool).all():
            raise bad(f"pool has {int((~np.isfinite(pool)).sum())} non-finite values (NaN or inf)")
    recorded = None
    if "protocol" in arrays:
        try:
            recorded = json.loads(str(arrays["protocol"]))
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            raise bad("its protocol is not a JSON record")
    return {
        "mu": mu.astype(np.float64),
        "sigma": sigma.astype(np.float64),
        "pool": None if pool is None else pool.astype(np.float64),
        "protocol": recorded,
    }


def shard_has_images(path: Path) -> bool:
    """Whether a shard holds images (a shard of the analytic model holds only samples); a damaged shard is
    a one-line error naming it."""
    try:
        with zipfile.ZipFile(path) as z:
            if "images.npy" not in z.namelist():
                return False
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(
            f"shard {path} is corrupt or truncated ({e}); delete it and re-run to regenerate it"
        ) from e
    return len(store.read_shard(path, ("indices",))["indices"]) > 0


def load_reference(ctx: ImageContext, ref: str | None) -> Reference:
    """Reference statistics from an image folder, a folder of shards, or an .npz with mu and sigma
    (checked: a file that cannot be used is a one-line UsageError naming it and the fix)."""
    if not ref:
        raise UsageError(
            "fid, kid, precision and recall need reference images: set metrics.ref=<image folder, "
            "run folder or .npz with mu/sigma>"
        )
    path = Path(ref)
    if not path.exists():
        raise UsageError(
            f"metrics.ref={ref} does not exist; point it at an image folder, a run folder or an .npz"
        )
    ext = ctx.inception()
    if path.suffix == ".npz" and path.is_file():
        z = _read_reference_npz(path, ref, ext.dim)
        recorded = z["protocol"]
        if recorded is None and not ctx.cfg.get("ref_trust", False):
            raise UsageError(
                f"metrics.ref={ref} does not record how its statistics were computed; set "
                "metrics.ref_trust=true to use it anyway, or give the reference images"
            )
        if recorded is not None and recorded != ext.protocol:
            diff = sorted(
                k for k in set(recorded) | set(ext.protocol) if recorded.get(k) != ext.protocol.get(k)
            )
            raise UsageError(
                f"metrics.ref={ref} was computed with a different protocol ({', '.join(diff)} differ); "
                "recompute it from the reference images"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]
        return Reference(str(path), digest, recorded or {"trusted": "true"}, z["mu"], z["sigma"], z["pool"])
    if not path.is_dir():
        raise UsageError(
            f"metrics.ref={ref} is neither a folder nor an .npz; point it at an image folder, a run folder "
            "or an .npz with mu and sigma"
        )
    shards = sorted(path.rglob("shard-*.npz"))
    if shards:
        shards = [s for s in shards if shard_has_images(s)]
        if not shards:
            raise UsageError(
                f"metrics.ref={ref} is a folder of samplebench shards without images (a run of the analytic "
                "model?); point it at a run of an image model, an image folder or an .npz"
            )
        parts = [ctx.inception_features(s) for s in shards]
        pool = np.concatenate([p["pool"] for p in parts]).astype(np.float64)
        digest = _digest([shard_content_key(s) for s in shards])
    else:
        from samplebench.metrics.images import iter_image_batches, list_images

        try:
            files = list_images(path)
        except UsageError as e:
            raise UsageError(
                f"metrics.ref={ref} holds no images (png, jpg, jpeg, webp, bmp, directly in it) and no "
                "samplebench shards; point it at a folder of reference images, a run folder or an .npz"
            ) from e
        digest = _folder_hash(files)

        def compute() -> dict[str, np.ndarray]:
            feats = [
                ext(batch)["pool"].astype(np.float32)
                for batch in iter_image_batches(files, int(ctx.cfg.get("batch_size", 64)))
            ]
            return {"pool": np.concatenate(feats)}

        pool = ctx._cached("reference", ext.fingerprint(), digest, compute, ("pool",))["pool"]
        pool = pool.astype(np.float64)
    if len(pool) < 2:
        raise UsageError(
            f"metrics.ref={ref} holds {len(pool)} image; reference statistics need at least 2 (more "
            "than 2048 for a full-rank FID)"
        )
    from samplebench.metrics.inception import statistics

    mu, sigma = statistics(pool)
    return Reference(str(path), digest, ext.protocol, mu, sigma, pool)


def save_reference(ref: Reference, path: Path) -> None:
    """An .npz with mu, sigma and the protocol, usable as metrics.ref= later (and checked against it)."""
    _save_npz(path, mu=ref.mu, sigma=ref.sigma, protocol=np.asarray(json.dumps(ref.protocol, sort_keys=True)))


@dataclass
class CellScores:
    """What scoring one cell (or one image folder) produced."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # metric, value, ci_low, ci_high
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # per-image metric values
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> protocol record
    # Sample index of each per-image value (None: 0..n-1). With non-finite samples excluded, positions
    # are not indices, and paired tests must pair the same images.
    indices: np.ndarray | None = None
    # One line each: a metric of the cell that could not be computed (its row is NaN), printed by the stage.
    warnings: list[str] = field(default_factory=list)


def score_features(
    ctx: ImageContext,
    names: list[str],
    pool: np.ndarray | None,
    logits: np.ndarray | None,
    per_image: dict[str, np.ndarray],
) -> CellScores:
    """Metric rows from features that are already extracted (cells and plain folders share this)."""
    from samplebench.metrics import inception as inc

    out = CellScores(per_image=dict(per_image))
    reps = int(ctx.cfg.get("bootstrap", 200))
    fid_reps = int(ctx.sub("fid").get("bootstrap", min(reps, 200)))
    proto = dict(ctx.inception().protocol) if pool is not None else {}
    if any(n in NEEDS_REF for n in names):
        ref = ctx.reference()
        proto_ref = {
            **proto,
            "reference": ref.source,
            "reference_hash": ref.content_hash,
            "reference_images": str(len(ref.pool)) if ref.pool is not None else "statistics only",
        }
    for name in names:
        if name == "fid":
            # torch-fidelity's computation for n >= d; the equal low-rank form below d (much faster there).
            small = len(pool) < pool.shape[1]
            value = (
                stats.fid_low_rank(pool, ref.mu, ref.sigma)
                if small
                else inc.fid_from_features(pool, ref.mu, ref.sigma)
            )
            lo, hi = stats.percentile_interval(stats.fid_bootstrap(pool, ref.mu, ref.sigma, fid_reps))
            out.rows.append(dict(metric="fid", value=value, ci_low=lo, ci_high=hi))
            out.protocols["fid"] = {
                **proto_ref,
                "interval": f"percentile bootstrap of generated features, "
                f"{fid_reps} resamples; FID is biased upward at small n",
            }
        elif name in ("kid", "precision", "recall"):
            if ref.pool is None:
                raise UsageError(
                    f"{name} needs reference features, but metrics.ref={ref.source} holds only mu "
                    "and sigma; give the reference images"
                )
            if name == "kid":
                k = ctx.sub("kid")
                size = min(int(k.get("subset_size", 1000)), len(pool), len(ref.pool))
                value, _ = inc.kid_from_features(
                    pool, ref.pool, subsets=int(k.get("subsets", 100)), subset_size=size
                )
                lo, hi = stats.percentile_interval(stats.kid_bootstrap(pool, ref.pool, fid_reps))
                out.rows.append(dict(metric="kid", value=value, ci_low=lo, ci_high=hi))
                out.protocols["kid"] = {
                    **proto_ref,
                    "subsets": str(k.get("subsets", 100)),
                    "subset_size": str(size),
                    "interval": "percentile bootstrap of the "
                    "whole-set unbiased MMD^2 over generated features",
                }
            else:
                nb = int(ctx.sub("prc").get("neighborhood", 3))
                precision, recall = inc.prc_from_features(pool, ref.pool, neighborhood=nb)
                inside_ref, inside_gen = stats.prc_indicators(pool, ref.pool, nb)
                value = precision if name == "precision" else recall
                _, lo, hi = stats.mean_ci(inside_ref if name == "precision" else inside_gen, reps)
                out.rows.append(dict(metric=name, value=value, ci_low=lo, ci_high=hi))
                out.protocols[name] = {
                    **proto_ref,
                    "neighborhood": str(nb),
                    "interval": "percentile bootstrap "
                    "of per-sample manifold membership, manifolds held fixed",
                }
        elif name == "is":
            splits = int(ctx.sub("is").get("splits", 10))
            value, _ = inc.isc_from_logits(logits, splits=splits)
            lo, hi = stats.percentile_interval(stats.isc_bootstrap(logits, splits, min(reps, 200)))
            out.rows.append(dict(metric="is", value=value, ci_low=lo, ci_high=hi))
            out.protocols["is"] = {
                **proto,
                "splits": str(splits),
                "interval": "percentile bootstrap over images",
            }
        elif name in per_image:
            value, lo, hi = stats.mean_ci(per_image[name], reps)
            out.rows.append(dict(metric=name, value=value, ci_low=lo, ci_high=hi))
    return out


def score_image_cell(ctx: ImageContext, cell: store.CellRecord, names: list[str]) -> CellScores:
    """Every requested image metric of one finished cell, streaming its shards."""
    from samplebench.metrics import trajectory

    want_inception = any(n in ("fid", "kid", "is", "precision", "recall") for n in names)
    want_clip = any(n in ("clip_score", "clip_score_paper") for n in names)
    pools, logits, cos, rewards, mse, kept = [], [], [], [], [], []
    n_cell = int(cell.info["num_images"])
    for _, _, path in cell.shards():
        flags = store.read_shard(path, ("finite", "indices"))
        keep = flags["finite"] & (flags["indices"] < n_cell)  # the samples n_images counts
        kept.append(flags["indices"][keep])
        if want_inception:
            f = ctx.inception_features(path)
            pools.append(f["pool"][keep])
            logits.append(f["logits"][keep])
        if want_clip:
            cos.append(ctx.clip_cosines(path)[keep])
        if "image_reward" in names:
            rewards.append(ctx.rewards(path)[keep])
        if "traj_mse" in names:
            data = store.read_shard(path, ("samples", "indices"))
            ref = trajectory.reference_latents(ctx, cell, path, data["indices"])
            mse.append(trajectory.per_image_mse(data["samples"], ref)[keep])
    per_image: dict[str, np.ndarray] = {}
    protocols: dict[str, dict[str, Any]] = {}
    if want_clip:
        from samplebench.metrics.clip_score import clip_score_paper, clip_score_torchmetrics

        c = np.concatenate(cos)
        per_image["clip_score"] = clip_score_torchmetrics(c)
        per_image["clip_score_paper"] = clip_score_paper(c)
        for n, scale in (
            ("clip_score", "100 x max(cos, 0) (torchmetrics)"),
            ("clip_score_paper", "2.5 x max(cos, 0) (CLIPScore paper, Hessel et al. 2021)"),
        ):
            protocols[n] = {
                **ctx.clip().protocol,
                "scaling": scale,
                "interval": "percentile bootstrap over images",
            }
    if rewards:
        per_image["image_reward"] = np.concatenate(rewards)
        protocols["image_reward"] = {**ctx.reward().protocol, "interval": "percentile bootstrap over images"}
    if mse:
        per_image["traj_mse"] = np.concatenate(mse)
        protocols["traj_mse"] = trajectory.describe(ctx)
    pool = np.concatenate(pools).astype(np.float64) if pools else None
    logit = np.concatenate(logits).astype(np.float64) if logits else None
    scores = score_features(ctx, names, pool, logit, per_image)
    scores.protocols.update(protocols)
    scores.indices = np.concatenate(kept)
    return scores
