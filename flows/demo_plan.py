"""What `sora demo` runs: the plan (data size, time budgets, what it samples and scores) of the
default and the quick demo. Kept apart from flows/demo.py so the CLI builds its flags without
importing Prefect."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class DemoPlan:
    """What one demo run does: data size, each model's time budget, and what it samples and scores."""

    clips: int  # shapes-world training clips
    tiny_clips: bool  # TINY clip ranges (fast) instead of the default ranges
    vae_minutes: float  # VAE training budget
    vae_holdout: int  # clips held out to score the VAE's reconstruction (PSNR)
    captioner_minutes: float  # captioner training budget
    captioner_eval: int  # held-out clips the captioner is scored on
    dit_minutes: float  # DiT training budget
    dit_steps: int | None  # stop the DiT at this many steps, if sooner than its budget
    eval_prompts: int  # held-out prompts for the prompt-adherence eval
    steps: int  # sampling steps for samples and eval
    sample_size: tuple[int, int]  # (width, height) at the 16:9 sample; others keep its pixel count
    sample_frames: int  # frames per sample video
    dit_overrides: dict = field(default_factory=dict)  # extra TrainConfig fields (the DiT recipe)
    draft_prompts: int = 0  # held-out prompts generated as draft -> refined, to check they agree
    vae_workers: int = 2  # Ray Train workers of the VAE (data parallel)
    encode_actors: int = 2  # encode actors, each with its own VAE and text encoder (at most one per core)

    def __post_init__(self):
        for name in ("clips", "vae_holdout", "captioner_eval", "eval_prompts", "steps", "sample_frames", "vae_workers",
                     "encode_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (--{name.replace('_', '-')}), got {getattr(self, name)}")
        for name in ("vae_minutes", "captioner_minutes", "dit_minutes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (--{name.replace('_', '-')}), got {getattr(self, name)}")
        if self.dit_steps is not None and self.dit_steps < 1:
            raise ValueError(f"dit_steps must be at least 1 or none (--dit-steps), got {self.dit_steps}")
        if self.draft_prompts < 0:
            raise ValueError(f"draft_prompts must be >= 0 (--draft-prompts), got {self.draft_prompts}")

    def estimate_minutes(self) -> float:
        """The run's expected wall time on 2 cores: the training budgets plus per-clip data
        costs (synth, ingest, encode) and per-prompt eval costs (a draft ~ 4 plain prompts)."""
        return (self.vae_minutes + self.captioner_minutes + self.dit_minutes + 1.0
                + 0.6 + self.clips * 0.0024 + (self.eval_prompts + 4 * self.draft_prompts) * 0.01
                + (0.5 if self.tiny_clips else 3.0))


PLANS = {
    # 2,400 clips: on fewer the DiT sees each clip so often in its 20 minutes that it memorises them
    "default": DemoPlan(clips=2400, tiny_clips=False, vae_minutes=7.0, vae_holdout=48, captioner_minutes=3.0,
                        captioner_eval=100, dit_minutes=20.0, dit_steps=None, eval_prompts=100, steps=20,
                        sample_size=(112, 64), sample_frames=17,
                        # the DiT recipe for a tiny model and a few thousand steps: a high learning
                        # rate, Muon on the blocks' matrices, 2,048-token packs, a short EMA and a
                        # linear cooldown to 0 over the last 20% (docs/experiments.md, "demo recipe")
                        dit_overrides={"lr": 3e-3, "warmup_steps": 100, "ema_decay": 0.995, "tokens_per_step": 2048,
                                       "checkpoint_every_minutes": 5.0, "optimizer": "muon", "muon_lr": 6e-3,
                                       "schedule": "cooldown", "cooldown_fraction": 0.2, "min_lr_ratio": 0.0},
                        draft_prompts=24),
    # every phase once at the smallest size that still runs it: its time is Ray's, Ray Train's and
    # the models' start-up, so one VAE worker and one encode actor (the captioner and DiT keep two)
    "quick": DemoPlan(clips=12, tiny_clips=True, vae_minutes=0.05, vae_holdout=2, captioner_minutes=0.05,
                      captioner_eval=2, dit_minutes=0.3, dit_steps=20, eval_prompts=6, steps=2,
                      sample_size=(64, 32), sample_frames=9, dit_overrides={"ema_decay": 0.9, "optimizer": "muon"},
                      draft_prompts=2, vae_workers=1, encode_actors=1),
}


def make_plan(quick: bool, overrides: dict | None = None) -> DemoPlan:
    """The quick or default plan with some fields replaced (their values checked)."""
    overrides = dict(overrides or {})
    if "sample_size" in overrides:
        overrides["sample_size"] = tuple(overrides["sample_size"])
    return replace(PLANS["quick" if quick else "default"], **overrides)
