"""Every fit option in one place: :class:`FitConfig`, a frozen dataclass with defaults and checks.

The Python API (``ppvi.fit(model, **options)``), the command line (``ppvi fit``'s
options are generated from the fields below), config.json (``"settings"``) and
``--resume`` all read this one list. A field's metadata holds its help text;
``cli=False`` keeps it off the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UsageError
from .init import INIT_CHOICES
from .pyro_util import finite, positive

__all__ = ["FitConfig", "DEFAULT_STEPS", "DEFAULT_LR", "IWAE_DEFAULT_PARTICLES", "RESUME_MAY_CHANGE"]

DEFAULT_STEPS, DEFAULT_LR = 1000, 0.01
IWAE_DEFAULT_PARTICLES = 5  # K for --estimator iwae without --num-particles (Burda et al. 2016 report k = 5 and 50)
MAX_SEED = 2**32 - 1  # pyro.set_rng_seed seeds NumPy too, whose seeds are 32-bit
# Settings a resumed run may change without changing what it computes.
RESUME_MAY_CHANGE = ("device", "checkpoint_every", "threads")
# No --steps/--epochs: a minibatch fit of a model whose file counts its schedule in epochs (the VAE family)
# stops early on a held-out split (at most those epochs); other minibatch fits keep the fixed default, since
# the best held-out checkpoint of a global latent fits the held-out points (normal model, 10 held out: mean
# 1.7 sd off). A full-batch
# fit stops when converged (ppvi.convergence, at most MAX_STEPS_FACTOR x 1,000 steps) unless its model file
# declares a tuned schedule ("steps" in FIT_DEFAULTS, as the gallery's do), which is then kept: measured on the
# gallery, the rule was not reliably as accurate as those schedules (beta_bernoulli: q's sd 23% off against 4%).
# --max-steps N turns the rule on for any fit; FIT_DEFAULTS {"auto_stop": True/False} sets a model's default
# (and FIT_DEFAULTS["by_guide"][guide] a guide's: the gallery's linear regression keeps lowrank on its schedule).
AUTO_STOP_DEFAULT = True
MAX_STEPS_FACTOR = 3  # default --max-steps: this many times the model's default steps


def _option(default=None, help: str = "", cli: bool = True):
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class FitConfig:
    """The options of one fit. None means "the model file's default, else ppvi's" (see :meth:`resolve`).

    Checked on construction: a bad value is a :class:`~ppvi.errors.UsageError` before any data is read.
    """

    guide: str | None = _option(help="Guide: a name from the model file (default: its first), or an autoguide name such as AutoNormal.")
    estimator: str = _option("auto", "auto, reparam, score, enum, gumbel or iwae.")
    baseline: str | None = _option(help="Score-function baseline: none, average or neural (default neural; --estimator score only).")
    temperature: float | None = _option(help="Gumbel-softmax initial temperature (default 1.0; --estimator gumbel only).")
    anneal_rate: float | None = _option(help="Gumbel-softmax: tau = max(min, temperature * exp(-rate * step)) (default: reach the floor at mid-fit).")
    min_temperature: float | None = _option(help="Gumbel-softmax temperature floor (default 0.5).")
    straight_through: bool | None = _option(help="Gumbel-softmax straight-through: discrete forward, relaxed backward.")
    steps: int | None = _option(help="Optimizer steps (default from the model file, else 1000).")
    epochs: int | None = _option(help="Passes over the data (instead of --steps).")
    batch_size: int | None = _option(help="Minibatch size (default: full batch).")
    lr: float | None = _option(help="Adam learning rate (default from the model file, else 0.01).")
    lr_decay: float | None = _option(help="Decay the learning rate by this factor over the fit (e.g. 0.1), as ClippedAdam's lrd.")
    betas: tuple[float, float] | None = _option(help="Adam's betas as B1,B2 (default 0.9,0.999; Pyro's tutorials use e.g. 0.8,0.99).")
    clip_norm: float | None = _option(help="Clamp every gradient element to [-C, C] before the Adam step, as Pyro's ClippedAdam clip_norm does.")
    num_particles: int | None = _option(help="Samples per ELBO estimate (default from the model file, else 1); K for iwae (default 5).")
    vectorize_particles: bool | None = _option(help="Draw the particles in one vectorized pass.", cli=False)
    device: str = _option("auto", "auto (CUDA when present), cpu or cuda.")
    seed: int = _option(0, "Random seed; restart r uses seed + r.")
    restarts: int = _option(1, "Independent fits from different seeds.")
    checkpoint_every: int | None = _option(help="Steps between checkpoints (default: about every 10 s).")
    max_steps: int | None = _option(help="Stop when converged, at most this many steps (without --steps/--epochs; turns the rule on "
                                         "for any model; your own code without a declared schedule gets it with a cap of 3,000).")
    init: str = _option("auto", "Start of restart 0: auto (Laplace start for Gaussian autoguides where the model has a mode, "
                                "else the guide's own), laplace or default. Restarts > 0 start dispersed around it.")
    threads: int | None = _option(help="torch intra-op threads (default: 1 for models under 100,000 parameter elements, else torch's default).")
    auto_stop: bool | None = _option(help="Stop when converged (set by resolve: no --steps/--epochs).", cli=False)

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both.")
        if self.init not in INIT_CHOICES:
            raise UsageError(f"--init must be one of {', '.join(INIT_CHOICES)} (got {self.init!r}).")
        for name in ("steps", "epochs", "batch_size", "num_particles", "restarts", "checkpoint_every", "max_steps", "threads"):
            positive(name.replace("_", "-"), getattr(self, name))
        for name in ("lr", "lr_decay", "clip_norm"):
            positive(name.replace("_", "-"), getattr(self, name), kind=float)
        # the estimator options (baseline, temperature ...) are checked by the estimators, where they are used
        finite("seed", self.seed, kind=int, low=0, high=MAX_SEED - self.restarts + 1)
        if self.betas is not None:
            if len(self.betas) != 2:
                raise UsageError(f"--betas takes two numbers B1,B2 (got {self.betas!r}).")
            for beta in self.betas:
                finite("betas", beta, low=0.0)
                if beta >= 1:
                    raise UsageError(f"--betas must each lie in [0, 1) (got {beta!r}).")
        for name in ("guide", "estimator", "baseline", "device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"--{name} takes a name (got {value!r}).")

    @classmethod
    def from_options(cls, **options) -> FitConfig:
        """A FitConfig from keyword options; an unknown name is a usage error naming the known ones."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown fit option {unknown[0]!r}; the fit options are: {', '.join(sorted(known))}.")
        if options.get("betas") is not None:
            options["betas"] = tuple(options["betas"])
        return cls(**options)

    def resolve(self, defaults: dict) -> FitConfig:
        """Fill the options left at None from a model file's ``FIT_DEFAULTS``, else ppvi's defaults."""
        num_particles = self.num_particles if self.num_particles is not None else defaults.get("num_particles", 1)
        if self.num_particles is None and self.estimator == "iwae":
            num_particles = max(IWAE_DEFAULT_PARTICLES, num_particles)
        batch_size = self.batch_size if self.batch_size is not None else defaults.get("batch_size")
        scheduled = batch_size is None and self.lr_decay not in (None, 1.0)  # the rule cuts a full-batch fit's lr itself
        if scheduled and self.max_steps is not None and self.steps is None and self.epochs is None:
            raise UsageError("--max-steps stops a full-batch fit by a rule that cuts the learning rate itself; "
                             "--lr-decay sets a schedule instead: give --steps N with --lr-decay, or drop --lr-decay.")
        auto_stop = self.auto_stop if self.auto_stop is not None else (
            (self.max_steps is not None or defaults.get("auto_stop", AUTO_STOP_DEFAULT and (
                "epochs" in defaults if batch_size is not None else "steps" not in defaults)))
            and self.steps is None and self.epochs is None and not scheduled)
        if auto_stop and self.steps is None and self.epochs is None:
            if self.max_steps is not None:
                defaults = {**defaults, "steps": self.max_steps}
            elif batch_size is None:
                defaults = {**defaults, "steps": MAX_STEPS_FACTOR * defaults.get("steps", DEFAULT_STEPS)}
            if batch_size is None:  # a fixed step size, which the stopping rule then cuts itself (Dhaka et al. 2020)
                defaults = {**defaults, "lr_decay": 1.0}
        return dataclasses.replace(
            self,
            auto_stop=bool(auto_stop),
            steps=self.steps if self.steps is not None or self.epochs is not None else (
                defaults.get("steps", DEFAULT_STEPS) if "steps" in defaults or "epochs" not in defaults else None),
            epochs=self.epochs if self.steps is not None or self.epochs is not None or "steps" in defaults else defaults.get("epochs"),
            batch_size=self.batch_size if self.batch_size is not None else defaults.get("batch_size"),
            lr=self.lr if self.lr is not None else defaults.get("lr", DEFAULT_LR),
            lr_decay=self.lr_decay if self.lr_decay is not None else defaults.get("lr_decay", 1.0),
            num_particles=num_particles,
            vectorize_particles=self.vectorize_particles if self.vectorize_particles is not None else defaults.get("vectorize_particles"),
        )

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas) if self.betas is not None else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> FitConfig:
        """Read back what :meth:`to_dict` wrote (config.json's ``"settings"``)."""
        if not isinstance(values, dict):
            raise UsageError(f"fit settings must be a mapping (got {type(values).__name__}).")
        return cls.from_options(**values)

    def differences(self, other: FitConfig) -> list[str]:
        """The settings that differ from ``other``, leaving out those a resumed run may change."""
        return [
            item.name
            for item in dataclasses.fields(self)
            if item.name not in RESUME_MAY_CHANGE and getattr(self, item.name) != getattr(other, item.name)
        ]

    def lr_at(self, step: int, total_steps: int) -> float:
        """lr * lr_decay ** (step / total_steps): a function of the step alone, so resuming needs no scheduler state."""
        return self.lr * self.lr_decay ** (step / total_steps) if self.lr_decay != 1.0 else self.lr

    @staticmethod
    def legacy(config: dict) -> dict:
        """The settings of a config.json written before ``"settings"`` existed."""
        steps = None if config.get("epochs") else config.get("steps")
        return {
            "guide": config.get("guide"),
            "estimator": config.get("estimator_requested", "auto"),
            **config.get("estimator_settings", {}),
            "steps": steps,
            "epochs": config.get("epochs"),
            "batch_size": config.get("batch_size"),
            "lr": config.get("lr"),
            "lr_decay": config.get("lr_decay"),
            "num_particles": config.get("num_particles"),
            "vectorize_particles": config.get("vectorize_particles"),
            "device": str(config.get("device", "auto")).split(":")[0],
            "seed": config.get("seed", 0),
            "restarts": config.get("restarts", 1),
            "checkpoint_every": config.get("checkpoint_every"),
        }
