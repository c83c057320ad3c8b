"""The margin must be nearly free: ArcFace and the margin family vs a plain normalised softmax.

Times forward + backward (w.r.t. embeddings and centres) of jitted losses of
the same shapes, warm, interleaved repeats, in one run:

  plain     normalised-softmax cross-entropy (no margin), written as autodiff does it
  arcface   the trainer's head: `head.margin_softmax` with ArcFace (arccos/cos on the
            B target values only; the softmax kept for the backward)
  reference `losses.margin_softmax_loss` with ArcFace (`margins.combined_margin`)
  naive     ArcFace written with arccos/cos over the whole B×C matrix

and the family after ArcFace as the trainer runs it (`losses.make_loss_fn` over the
head's whole block, its state and per-row values included): subcenter_arcface (K
sub-centres a class), curricularface, magface, adaface, elasticface_arc,
elasticface_cos. Each against plain, as the ratio of the times of the same round
(median, and the quartiles over the rounds: the spread); sub-center also against a
plain softmax over its K·C sub-centres (plain_KC), the matrix product it must do.

  python -m benchmarks.head [--classes 10000 85742] [--repeats 21] [--subcenters 3] [--smoke]
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arcjax import head, losses, margins
from benchmarks import timing

ARCFACE = margins.make_margin(m2=0.5)


def _plain(x, w, y):
  logits = 64.0 * (head.l2_normalize(x) @ head.l2_normalize(w).T)
  return jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def _arcface(x, w, y):
  return head.margin_softmax(x, w, y, margin=ARCFACE, s=64.0)[0]


def _reference(x, w, y):
  return losses.margin_softmax_loss(x, w, y, s=64.0, m2=0.5)[0]


def _naive_arcface(x, w, y):
  cos = losses.l2_normalize(x) @ losses.l2_normalize(w).T
  theta = jnp.arccos(jnp.clip(cos, -1 + 1e-6, 1 - 1e-6))
  target = jax.nn.one_hot(y, w.shape[0], dtype=bool)
  logits = 64.0 * jnp.where(target, jnp.cos(theta + 0.5), cos)
  return jnp.mean(jax.nn.logsumexp(logits, 1) - logits[jnp.arange(y.shape[0]), y])


def _family(kind: str, num_classes: int, subcenters: int):
  """The trainer's loss of `kind` over the whole-block head: (x, w, y) -> loss."""
  changes = {"subcenters": subcenters} if kind == "subcenter_arcface" else {}
  config = losses.loss_config(kind, **changes)
  head_config = ml_collections.ConfigDict(dict(sharded=False, sample_rate=1.0, chunk_size=0))
  loss_fn = losses.make_loss_fn(config, head.margin_term(config, head_config, num_classes),
                                num_classes)
  state, key = losses.init_loss_state(config), jax.random.key(0)
  return lambda x, w, y: loss_fn(x, {"centres": w}, y, key, 1.0, state)[0]


def _ratio(times: list[float], plain: list[float]) -> str:
  """Median [first–third quartile] of the per-round ratios."""
  ratios = [t / p for t, p in zip(times, plain)]
  if len(ratios) < 2:
    return f"{ratios[0]:.3f}"
  q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
  return f"{median:.3f} [{q1:.3f}–{q3:.3f}]"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 85_742])
  parser.add_argument("--subcenters", type=int, default=3, help="K of subcenter_arcface")
  parser.add_argument("--repeats", type=int, default=21)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repeats (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.batch, args.dim, args.classes, args.repeats = 64, 32, [1000], 3
  kinds = tuple(losses.FAMILY)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"B={args.batch}, d={args.dim}, K={args.subcenters}, forward+backward, "
        f"{args.repeats} interleaved repeats: median ms; ratio to plain per round, median "
        "[quartiles]")
  rng = np.random.default_rng(0)
  rows = []
  for num_classes in args.classes:
    x = jnp.asarray(rng.normal(size=(args.batch, args.dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(num_classes, args.dim)), jnp.float32)
    w_k = jnp.asarray(rng.normal(size=(num_classes, args.subcenters, args.dim)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, args.batch), jnp.int32)
    named = [("plain", _plain), ("arcface", _arcface), ("reference", _reference),
             ("naive", _naive_arcface),
             *((kind, _family(kind, num_classes, args.subcenters)) for kind in kinds)]
    fns = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1))) for name, fn in named}
    # Sub-center's centres are (C, K, d); plain_KC, a plain softmax over those K·C rows.
    flat_k = w_k.reshape(-1, args.dim)
    fns["plain_KC"] = lambda x, w, y, f=jax.jit(jax.value_and_grad(_plain, (0, 1))): f(x, flat_k, y)
    subcenter = fns.pop("subcenter_arcface")
    fns["subcenter_arcface"] = lambda x, w, y, f=subcenter: f(x, w_k, y)
    times = timing.interleaved_seconds(fns, (x, w, y), args.repeats)
    rows.append((num_classes, times))

  print("| C | plain ms | arcface ms | reference ms | naive ms | arcface / plain | "
        "reference / plain | naive / plain |")
  print("|---|---|---|---|---|---|---|---|")
  for num_classes, times in rows:
    ms = {name: f"{1e3 * statistics.median(t):.1f}" for name, t in times.items()}
    print(f"| {num_classes} | {ms['plain']} | {ms['arcface']} | {ms['reference']} | "
          f"{ms['naive']} | {_ratio(times['arcface'], times['plain'])} | "
          f"{_ratio(times['reference'], times['plain'])} | "
          f"{_ratio(times['naive'], times['plain'])} |")
  print()
  print("| C | loss | ms | / plain | / plain over K·C |")
  print("|---|---|---|---|---|")
  for num_classes, times in rows:
    print(f"| {num_classes} | plain_KC | {1e3 * statistics.median(times['plain_KC']):.1f} | "
          f"{_ratio(times['plain_KC'], times['plain'])} | 1 |")
    for kind in kinds:
      over_kc = (_ratio(times[kind], times["plain_KC"]) if kind == "subcenter_arcface"
                 else "–")
      print(f"| {num_classes} | {kind} | {1e3 * statistics.median(times[kind]):.1f} | "
            f"{_ratio(times[kind], times['plain'])} | {over_kc} |")


if __name__ == "__main__":
  main()
