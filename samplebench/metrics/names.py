"""Metric names, importable without torch (the planner checks them before any work starts)."""

ANALYTIC = ("fd_exact", "traj_err", "mmd_exact")
IMAGE = (
    "fid",
    "kid",
    "is",
    "precision",
    "recall",
    "clip_score",
    "clip_score_paper",
    "image_reward",
    "traj_mse",
)
ALL = ANALYTIC + IMAGE
# Scored against each image's own prompt: they apply to text-to-image models only.
TEXT = ("clip_score", "clip_score_paper", "image_reward")
