"""The margin must be nearly free: ArcFace vs a plain normalised softmax.

Times forward + backward (w.r.t. embeddings and centres) of jitted losses of
the same shapes, warm, median of repeats, in one run:

  plain     normalised-softmax cross-entropy (no margin), written as autodiff does it
  arcface   the trainer's head: `head.margin_softmax` with ArcFace (arccos/cos on the
            B target values only; the softmax kept for the backward)
  reference `losses.margin_softmax_loss` with ArcFace (`margins.combined_margin`)
  naive     ArcFace written with arccos/cos over the whole B×C matrix

  python -m benchmarks.head [--classes 10000 85742] [--repeats 21] [--smoke]
"""

import argparse

import jax
import jax.numpy as jnp
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 85_742])
  parser.add_argument("--repeats", type=int, default=21)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repeats (CI)")
  args = parser.parse_args()
  if args.smoke:
    args.batch, args.dim, args.classes, args.repeats = 64, 32, [1000], 3

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"B={args.batch}, d={args.dim}, forward+backward, median of {args.repeats}")
  print("| C | plain ms | arcface ms | reference ms | naive ms | arcface / plain | "
        "reference / plain | naive / plain |")
  print("|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for num_classes in args.classes:
    x = jnp.asarray(rng.normal(size=(args.batch, args.dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(num_classes, args.dim)), jnp.float32)
    y = jnp.asarray(rng.integers(0, num_classes, args.batch), jnp.int32)
    fns = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
           for name, fn in [("plain", _plain), ("arcface", _arcface), ("reference", _reference),
                            ("naive", _naive_arcface)]}
    seconds = timing.median_seconds(fns, (x, w, y), args.repeats)
    ms = {name: f"{1e3 * value:.1f}" for name, value in seconds.items()}
    ratio = {name: f"{value / seconds['plain']:.3f}" for name, value in seconds.items()}
    print(f"| {num_classes} | {ms['plain']} | {ms['arcface']} | {ms['reference']} | "
          f"{ms['naive']} | {ratio['arcface']} | {ratio['reference']} | {ratio['naive']} |")


if __name__ == "__main__":
  main()
