"""The optimiser and the learning-rate schedule of `config.train` (optax).

The optimiser updates {'backbone': params, 'head': head}; weight decay applies
to kernels and class centres (≥ 2-D) only. The learning rate and the weight
decay may be traced (`TRACED_FIELDS`: the runs of a pack differ in them); the
optimiser state's structure does not depend on their values, so the step can
build the optimiser from its per-run values.
"""

import math
from typing import Any

import jax
import ml_collections
import optax

from arcjax import errors

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "poly")
# insightface's PolyScheduler decays the learning rate as (1 - progress)^2.
POLY_POWER = 2.0
# The config.train fields a step may take as traced values (`make_optimizer`'s hparams).
TRACED_FIELDS = ("lr", "weight_decay")


def check_config(train_config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first optimiser or schedule value out of range."""
  if train_config.optimizer not in OPTIMIZERS:
    raise errors.ConfigError(f"config.train.optimizer must be one of {OPTIMIZERS}, "
                             f"got {train_config.optimizer!r}")
  if not (math.isfinite(train_config.lr) and train_config.lr > 0):
    raise errors.ConfigError(f"config.train.lr must be finite and > 0, got {train_config.lr!r}")
  if not 0 <= train_config.momentum < 1:
    raise errors.ConfigError(f"config.train.momentum must be in [0, 1), "
                             f"got {train_config.momentum!r}")
  if not (math.isfinite(train_config.weight_decay) and train_config.weight_decay >= 0):
    raise errors.ConfigError(f"config.train.weight_decay must be finite and >= 0, "
                             f"got {train_config.weight_decay!r}")
  if not (math.isfinite(train_config.grad_clip) and train_config.grad_clip >= 0):
    raise errors.ConfigError(f"config.train.grad_clip must be finite and >= 0 (0: none), "
                             f"got {train_config.grad_clip!r}")
  if not train_config.max_param_norm > 0:
    raise errors.ConfigError(f"config.train.max_param_norm must be > 0, "
                             f"got {train_config.max_param_norm}")
  if train_config.schedule not in SCHEDULES:
    raise errors.ConfigError(f"config.train.schedule must be one of {SCHEDULES}, "
                             f"got {train_config.schedule!r}")
  steps, warmup = train_config.steps, train_config.warmup_steps
  if not 0 <= warmup < steps:
    raise errors.ConfigError(f"config.train.warmup_steps must be in [0, train.steps={steps}), "
                             f"got {warmup!r}")
  given = tuple(train_config.lr_boundaries)
  fractions = [0 < b < 1 for b in given]
  if any(fractions) and not all(fractions):
    raise errors.ConfigError("config.train.lr_boundaries must be all fractions of train.steps "
                             f"(in (0, 1)) or all step numbers, got {given}")
  boundaries = boundary_steps(train_config)
  if boundaries != sorted(set(boundaries)) or any(b <= warmup for b in boundaries):
    raise errors.ConfigError("config.train.lr_boundaries must give increasing steps after the "
                             f"warm-up ({warmup}), got {given} → steps {tuple(boundaries)}")
  if any(b >= steps for b in boundaries):
    raise errors.ConfigError(
        f"config.train.lr_boundaries {given} are not all below train.steps={steps}: the "
        "learning rate would never decay at them; give them as fractions of the run "
        "(e.g. (0.625, 0.875)) to follow its length")


def boundary_steps(train_config: ml_collections.ConfigDict) -> list[int]:
  """The steps of `lr_boundaries`: fractions in (0, 1) of `train.steps`, or step numbers."""
  return [int(b * train_config.steps) if 0 < b < 1 else int(b)
          for b in train_config.lr_boundaries]


def _hparams(train_config: ml_collections.ConfigDict,
             hparams: dict[str, Any] | None) -> dict[str, Any]:
  return {name: train_config[name] for name in TRACED_FIELDS} if hparams is None else hparams


def make_schedule(train_config: ml_collections.ConfigDict,
                  hparams: dict[str, Any] | None = None) -> optax.Schedule:
  """Learning rate as a function of the step (the update count, from 0).

  `hparams['lr']` (a float or a traced scalar) replaces `train_config.lr` when given.

  A linear warm-up from 0 to `lr` over `warmup_steps` (none when 0), then
    'piecewise': `lr` divided by 10 at each of `lr_boundaries` (the paper's;
      `boundary_steps`);
    'poly': lr · (1 − (t − warmup) / (steps − warmup))² (insightface's PolyScheduler).
  """
  lr = _hparams(train_config, hparams)["lr"]
  warmup, steps = train_config.warmup_steps, train_config.steps
  if train_config.schedule == "piecewise":
    boundaries = [b - warmup for b in boundary_steps(train_config)]
    main = optax.piecewise_constant_schedule(lr, {b: 0.1 for b in boundaries})
  else:
    main = optax.polynomial_schedule(lr, 0.0, POLY_POWER, steps - warmup)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(trainable: Any) -> Any:
  # Weight decay on kernels and class centres only: BN scales and offsets, PReLU
  # slopes and biases (all 1-D) are left alone, as is usual since Goyal et al. 2017.
  return jax.tree.map(lambda x: x.ndim > 1, trainable)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   hparams: dict[str, Any] | None = None) -> optax.GradientTransformation:
  """The optimiser of `config.train` over {'backbone': params, 'head': head}.

  'sgd': gradient (clipped to global norm `grad_clip` if > 0) plus
  `weight_decay`·w on ≥2-D parameters, then momentum SGD as PyTorch's
  (v ← μv + g, w ← w − lr·v): the paper's SGD with momentum 0.9 and 5e-4.
  'adamw': clipping, then AdamW with decoupled `weight_decay` (same mask) and
  b1 = `momentum`.

  `hparams` {'lr', 'weight_decay'} (floats or traced scalars; other keys are
  ignored) replace the config's values when given; the state's structure is
  the same whatever they are.
  """
  hparams = _hparams(train_config, hparams)
  schedule, weight_decay = make_schedule(train_config, hparams), hparams["weight_decay"]
  clip = ([optax.clip_by_global_norm(train_config.grad_clip)]
          if train_config.grad_clip > 0 else [])
  if train_config.optimizer == "sgd":
    return optax.chain(*clip, optax.add_decayed_weights(weight_decay, _decay_mask),
                       optax.sgd(schedule, momentum=train_config.momentum))
  return optax.chain(*clip, optax.adamw(schedule, b1=train_config.momentum,
                                        weight_decay=weight_decay, mask=_decay_mask))
