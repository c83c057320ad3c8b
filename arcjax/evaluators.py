"""What the training loop evaluates, as big_vision's evaluators: each says when it is due.

  - `Verification`: insightface's verification protocol on every evaluation set
    (held-out identities, .bin files), every `eval.every` steps and at the end;
  - `Angles`: θ_y, the nearest non-target angle and the feature norm ‖x‖ of a
    fixed probe set of training images at the start, middle and end (and every
    `angles.every` steps), as arrays and histograms; the paper's angle statistics
    at the end;
  - `pixel_baseline`: what raw pixels score on the same pairs (once).

An evaluator is called with a `ModelView`: the model as host arrays at a step.
"""

from typing import Any, Callable, NamedTuple

import numpy as np

from arcjax import angles
from arcjax import errors
from arcjax import inference
from arcjax import losses
from arcjax import verification
from arcjax import workdir
from arcjax.data import pipeline


class ModelView(NamedTuple):
  """The model at `step`, on this host: backbone `variables` and the (C, d) `centres` (a
  sub-center head's (C, K, d))."""
  step: int
  variables: dict[str, Any]
  centres: np.ndarray

  @classmethod
  def of(cls, state, step: int, num_classes: int, host) -> "ModelView":
    """The model of a train state (global arrays), copied by `host` (`Parallelism.host`);
    the centres without a sharded head's padding."""
    arrays = host({"params": state.params, "batch_stats": state.batch_stats,
                   "centres": state.head["centres"]})
    return cls(step, {"params": arrays["params"], "batch_stats": arrays["batch_stats"]},
               arrays["centres"][:num_classes])


def check_config(eval_config: Any, angles_config: Any) -> None:
  """Raises ConfigError naming the first `config.eval` / `config.angles` value out of range."""
  for name, value, least in (("eval.every", eval_config.every, 0),
                             ("eval.batch_size", eval_config.batch_size, 1),
                             ("angles.probe_size", angles_config.probe_size, 0),
                             ("angles.every", angles_config.every, 0)):
    if not (isinstance(value, int) and value >= least):
      raise errors.ConfigError(f"config.{name} must be an int >= {least}, got {value!r}")


def verify_sets(embed, variables, eval_sets: dict, *, batch_size: int,
                flip: bool) -> dict[str, dict[str, float]]:
  """`verification.verification_summary` of every pair set: {set: scalars}."""
  results = {}
  for name, pair_set in eval_sets.items():
    embeddings = verification.embed_images(lambda x: embed(variables, x), pair_set.images,
                                           batch_size=batch_size, flip=flip)
    verified = verification.verify(embeddings[pair_set.pairs[:, 0]],
                                   embeddings[pair_set.pairs[:, 1]], pair_set.issame)
    results[name] = verification.verification_summary(verified)
  return results


def pixel_baseline(eval_sets: dict) -> dict[str, dict[str, float]]:
  """Verification of every pair set with raw pixels as embeddings (cosine similarity).

  What any model must beat: {set: {accuracy, accuracy_std, auc}}.
  """
  results = {}
  for name, pair_set in eval_sets.items():
    flat = np.asarray(pair_set.images, np.float64).reshape(len(pair_set.images), -1)
    verified = verification.verify(flat[pair_set.pairs[:, 0]], flat[pair_set.pairs[:, 1]],
                                   pair_set.issame)
    results[name] = {key: verified[key] for key in ("accuracy", "accuracy_std", "auc")}
  return results


class Shared(NamedTuple):
  """What the runs of one model and one data compute alike: the pixel baseline (`baseline`)
  and the jitted `embed` (`inference.embedder`: compiled once per batch shape). A pack's
  runs share one."""
  baseline: dict[str, dict[str, float]]
  embed: Callable[[Any, np.ndarray], Any]

  @classmethod
  def of(cls, config: Any, datasets) -> "Shared":
    return cls(pixel_baseline(datasets.eval_sets), inference.embedder(config.model))


class Verification:
  """insightface's verification of `eval_sets`, every `eval.every` steps and at the end.

  Its batch size depends on the sets alone (`inference.batch_size_for`), so that
  `python -m arcjax.evaluate` recomputes the same numbers exactly.
  """

  def __init__(self, config: Any, eval_sets: dict, embed: Callable[[Any, np.ndarray], Any]):
    self.eval_sets = eval_sets
    self._every, self._flip = config.eval.every, config.eval.flip
    self._embed = embed
    self._batch = inference.batch_size_for(
        config.eval.batch_size, *(len(pair_set.images) for pair_set in eval_sets.values()))

  def due(self, step: int, final: bool) -> bool:
    """At the end, and every `eval.every` steps (not at step 0: nothing is trained yet)."""
    return bool(self.eval_sets) and (
        final or bool(self._every and step > 0 and step % self._every == 0))

  def __call__(self, view: ModelView) -> dict[str, dict[str, float]]:
    return verify_sets(self._embed, view.variables, self.eval_sets, batch_size=self._batch,
                       flip=self._flip)


class Angles:
  """θ records of a fixed probe set of training images, and the paper's angle statistics.

  At steps 0, steps/2 and steps (and every `angles.every`): θ_y, the nearest
  non-target angle (radians) and the feature norm ‖x‖ (the backbone's output
  before normalisation: what MagFace and AdaFace read) of each probe image to
  angles/theta_step<N>.npz ('theta_target', 'theta_nearest', 'feature_norm',
  'labels'), and as histograms. At the end, also W-EC, W-Inter, Intra1, Inter1
  (probe set) and Intra2, Inter2 (identities never trained on), in degrees; W-EC
  and W-Inter are None for a loss that never trains the centres (Triplet alone).
  With sub-centres the angle to a class is the smallest to its sub-centres, and
  its centre in W-EC and W-Inter the dominant one (`angles.dominant_subcentres`).
  """

  def __init__(self, config: Any, train_source, unseen, writer, directory, *, primary: bool,
               embed: Callable[[Any, np.ndarray], Any]):
    size = min(config.angles.probe_size, len(train_source))
    image_size = tuple(config.data.image_size) if config.data.image_size else None
    indices = np.sort(np.random.default_rng(config.seed).permutation(len(train_source))[:size])
    self._images = pipeline.load_images(train_source, indices, image_size=image_size)
    self._labels = np.asarray(train_source.labels)[indices]
    self._unseen, self._writer, self._directory = unseen, writer, directory
    self._primary, self._trains_centres = primary, losses.trains_centres(config.loss)
    steps, every = config.train.steps, config.angles.every
    self._steps = {0, steps // 2, steps} | (set(range(every, steps, every)) if every else set())
    self._embed = embed
    self._batch = inference.batch_size_for(config.eval.batch_size, size,
                                           len(unseen[0]) if unseen else 0)

  def due(self, step: int, final: bool) -> bool:
    return len(self._images) > 0 and (final or step in self._steps)

  def _embeddings(self, view: ModelView, images: np.ndarray) -> np.ndarray:
    return verification.embed_images(lambda x: self._embed(view.variables, x), images,
                                     batch_size=self._batch, flip=False)

  def __call__(self, view: ModelView, final: bool = False) -> dict[str, float | None]:
    features = verification.model_outputs(lambda x: self._embed(view.variables, x),
                                          self._images, batch_size=self._batch)
    feature_norm = np.linalg.norm(np.asarray(features, np.float64), axis=1)
    embeddings = verification.unit_rows(features, "embeddings")
    theta_target = angles.target_angles(embeddings, view.centres, self._labels)
    theta_nearest = angles.nearest_nontarget_angles(embeddings, view.centres, self._labels)
    if self._primary:
      path = self._directory / workdir.ANGLES / f"theta_step{view.step:08d}.npz"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("wb") as f:
        np.savez(f, theta_target=theta_target, theta_nearest=theta_nearest,
                 feature_norm=feature_norm, labels=self._labels)
    edges = np.linspace(0.0, 180.0, 91)
    self._writer.write_histogram(view.step, "angles/theta_target_deg",
                                 np.degrees(theta_target), bins=edges)
    self._writer.write_histogram(view.step, "angles/theta_nearest_deg",
                                 np.degrees(theta_nearest), bins=edges)
    # Norms have no natural range (MagFace's 10-110, a plain softmax's anything): 50 bins
    # over this record's own; the arrays above keep every value.
    self._writer.write_histogram(view.step, "angles/feature_norm", feature_norm, bins=50)
    if not final:
      return {}
    unseen = ()
    if self._unseen is not None:
      unseen = (self._embeddings(view, self._unseen[0]), self._unseen[1])
    stats = angles.angle_statistics(embeddings, self._labels, view.centres, *unseen)
    if not self._trains_centres:
      stats.update(w_ec_deg=None, w_inter_deg=None)
    return stats


class Evaluators:
  """Every evaluator of a run, what they last found, and the rows and tables they leave.

  `due(step, final)`, then `run(view, final)`: verification's row and table, and
  the θ records (at the end: the angle statistics' row). Each (step, metric)
  reaches metrics.jsonl once, also when a resumed run evaluates a step again.
  `summary()`: what results.json holds of them. `shared`: `Shared.of(config, datasets)`,
  or a pack's.
  """

  def __init__(self, config: Any, datasets, writer, progress, directory, *, primary: bool,
               shared: Shared | None = None):
    shared = Shared.of(config, datasets) if shared is None else shared
    self.baseline = shared.baseline
    self._verification = Verification(config, datasets.eval_sets, shared.embed)
    self._angles = Angles(config, datasets.train, datasets.unseen, writer, directory,
                          primary=primary, embed=shared.embed)
    self._writer, self._progress = writer, progress
    self.eval_results: dict[str, dict[str, float]] = {}
    self.angle_stats: dict[str, float | None] | None = None

  def due(self, step: int, final: bool = False) -> bool:
    return self._verification.due(step, final) or self._angles.due(step, final)

  def _write_once(self, step: int, scalars: dict[str, Any]) -> None:
    if scalars and not self._writer.has(step, next(iter(scalars))):
      self._writer.write_scalars(step, scalars)

  def run(self, view: ModelView, final: bool = False) -> None:
    """Runs the evaluators due at `view.step` (`final`: the run's last step)."""
    if self._verification.due(view.step, final):
      self.eval_results = self._verification(view)
      self._write_once(view.step, {f"eval/{name}/{key}": value
                                   for name, summary in self.eval_results.items()
                                   for key, value in summary.items()})
      title = f"final verification (step {view.step})" if final else (
          f"step {view.step} verification")
      self._progress.write(f"{title}:\n"
                           + verification.format_table(self.eval_results, self.baseline))
    if self._angles.due(view.step, final):
      stats = self._angles(view, final=final)
      if final:
        self.angle_stats = {"step": view.step, **stats}
        self._write_once(view.step, {f"angles/{name}": value for name, value in stats.items()
                                     if value is not None})

  def summary(self) -> dict[str, Any]:
    return {"eval": self.eval_results, "pixel_baseline": self.baseline,
            "angle_stats": self.angle_stats}
