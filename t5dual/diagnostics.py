"""The SamToNe paper's pictures of an embedding space (Moiseev et al., 2023).

For one checkpoint and a dataset (queries with a positive document each):
  tsne.png         2-D t-SNE of sampled queries and their positive documents,
                   one colour per tower: do the two towers' spaces overlap?
  top1_cosine.png  histogram of cos(query, its top-1 document in the corpus)
  qq_qp_ratio.png  histogram of cos(q_i, q_j) / cos(q_i, p_j) over random pairs
                   i != j (p_j: query j's positive); near 1 when queries sit
                   among the documents, far from 1 when the spaces are apart
Given several checkpoints (say with and without SamToNe), each picture has one
panel per checkpoint, side by side, with shared axes for the histograms.
`stats.json` holds the numbers behind the pictures, including `knn_mixing`:
the mean share of a point's 10 nearest neighbours (cosine, full dimension)
that come from the other tower (0: separate spaces; 0.5: fully mixed).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np

from t5dual.data import sources

QUERY_COLOUR, DOC_COLOUR = '#1f77b4', '#d62728'


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Diagnostics:
  label: str
  tsne_queries: np.ndarray   # [n, 2]
  tsne_docs: np.ndarray      # [n, 2]
  top1_cosine: np.ndarray    # [num_queries]
  qq_qp_ratio: np.ndarray    # [num_pairs]
  stats: dict


def top1_cosines(query_vecs: np.ndarray, corpus, **search_kwargs) -> np.ndarray:
  """cos(query, top-1 document by inner product) for each query; `corpus` as in retrieval."""
  from t5dual import retrieval
  _, index = retrieval.exact_search(query_vecs, corpus, 1, **search_kwargs)
  docs = retrieval.as_embeddings(corpus).take(index[:, 0])
  return np.sum(_normalise(query_vecs) * _normalise(docs), axis=1)


def qq_qp_ratios(query_vecs: np.ndarray, positive_vecs: np.ndarray, num_pairs: int = 10000,
                 seed: int = 0) -> np.ndarray:
  """cos(q_i, q_j) / cos(q_i, p_j) for `num_pairs` random ordered pairs i != j."""
  n = len(query_vecs)
  if n < 2:
    raise sources.DataError(f'query-query similarities need at least 2 queries, got {n}')
  rng = np.random.default_rng(seed)
  i = rng.integers(0, n, num_pairs)
  j = (i + rng.integers(1, n, num_pairs)) % n
  q, p = _normalise(query_vecs), _normalise(positive_vecs)
  return np.sum(q[i] * q[j], axis=1) / np.sum(q[i] * p[j], axis=1)


def knn_mixing(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
  """Mean share of each point's k nearest neighbours (cosine) from the other set."""
  x = _normalise(np.concatenate([a, b]))
  side = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
  sims = x @ x.T
  np.fill_diagonal(sims, -np.inf)
  k = min(k, len(x) - 1)
  neighbours = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  return float(np.mean(side[neighbours] != side[:, None]))


def tsne_2d(query_vecs: np.ndarray, doc_vecs: np.ndarray, seed: int = 0,
            perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
  """One joint t-SNE (cosine metric) of both sets; returns their 2-D coordinates.

  Up to 500 points the exact gradient is used (faster and steadier there than
  Barnes-Hut, whose OpenMP threads suffer on busy machines).
  """
  from sklearn.manifold import TSNE
  x = _normalise(np.concatenate([query_vecs, doc_vecs])).astype(np.float32)
  perplexity = min(perplexity, (len(x) - 1) / 3)
  xy = TSNE(n_components=2, perplexity=perplexity, metric='cosine', init='pca',
            method='exact' if len(x) <= 500 else 'barnes_hut',
            random_state=seed).fit_transform(x)
  return xy[:len(query_vecs)], xy[len(query_vecs):]


def compute(label: str, query_vecs: np.ndarray, positive_vecs: np.ndarray, corpus,
            sample: int = 1000, num_pairs: int = 10000, seed: int = 0,
            **search_kwargs) -> Diagnostics:
  """All diagnostics of one checkpoint.

  query_vecs[i] and positive_vecs[i] are a query and one of its positives;
  `corpus` (array or export.Embeddings) is searched for the top-1 documents.
  t-SNE and k-NN mixing use `sample` random (query, positive) pairs.
  """
  query_vecs, positive_vecs = np.asarray(query_vecs), np.asarray(positive_vecs)
  if query_vecs.shape != positive_vecs.shape:
    raise ValueError(f'{label}: {query_vecs.shape} query vectors but {positive_vecs.shape} '
                     'positive vectors')
  rng = np.random.default_rng(seed)
  picked = np.sort(rng.choice(len(query_vecs), min(sample, len(query_vecs)), replace=False))
  tq, td = tsne_2d(query_vecs[picked], positive_vecs[picked], seed)
  top1 = top1_cosines(query_vecs, corpus, **search_kwargs)
  ratio = qq_qp_ratios(query_vecs, positive_vecs, num_pairs, seed)
  q, p = _normalise(query_vecs), _normalise(positive_vecs)
  stats = {
      'queries': len(query_vecs),
      'tsne_points_per_tower': len(picked),
      'knn_mixing': knn_mixing(query_vecs[picked], positive_vecs[picked]),
      'centroid_cosine': float(_normalise(q.mean(0)) @ _normalise(p.mean(0))),
      'positive_cosine_mean': float(np.mean(np.sum(q * p, axis=1))),
      'top1_cosine_mean': float(top1.mean()),
      'top1_cosine_median': float(np.median(top1)),
      'qq_qp_ratio_median': float(np.median(ratio)),
      'qq_qp_ratio_mean': float(ratio.mean()),
  }
  return Diagnostics(label, tq, td, top1, ratio, stats)


# --------------------------------------------------------------------------- pictures

def _figure(n: int, height: float = 4.0):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, height), squeeze=False)
  return plt, fig, list(axes[0])


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_tsne(diags: Sequence[Diagnostics], path: str) -> str:
  plt, fig, axes = _figure(len(diags))
  for ax, d in zip(axes, diags):
    ax.scatter(*d.tsne_queries.T, s=6, alpha=0.6, c=QUERY_COLOUR, label='queries (left tower)')
    ax.scatter(*d.tsne_docs.T, s=6, alpha=0.6, c=DOC_COLOUR, label='documents (right tower)')
    ax.set_title(f'{d.label}\nk-NN mixing {d.stats["knn_mixing"]:.2f}', fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc='best', fontsize=8, markerscale=2)
  fig.suptitle('t-SNE of query and document embeddings', fontsize=11)
  return _save(plt, fig, path)


def _histograms(diags: Sequence[Diagnostics], values: Sequence[np.ndarray], path: str,
                xlabel: str, title: str, clip: Optional[tuple[float, float]] = None,
                mark: Optional[float] = None) -> str:
  everything = np.concatenate(values)
  lo, hi = (np.percentile(everything, clip) if clip else (everything.min(), everything.max()))
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  bins = np.linspace(lo, hi, 51)
  plt, fig, axes = _figure(len(diags), 3.5)
  for ax, d, v in zip(axes, diags, values):
    outside = np.mean((v < lo) | (v > hi))
    ax.hist(np.clip(v, lo, hi), bins=bins, color='#555555')
    if mark is not None:
      ax.axvline(mark, color=DOC_COLOUR, lw=1)
    note = f', {outside:.1%} outside' if outside > 0 else ''
    ax.set_title(f'{d.label}\nmedian {np.median(v):.3f}, mean {np.mean(v):.3f}{note}',
                 fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_xlim(lo, hi)
  axes[0].set_ylabel('count')
  fig.suptitle(title, fontsize=11)
  return _save(plt, fig, path)


def plot_top1_cosine(diags: Sequence[Diagnostics], path: str) -> str:
  return _histograms(diags, [d.top1_cosine for d in diags], path, 'cos(query, top-1 document)',
                     'Cosine similarity of each query to its top-1 result')


def plot_qq_qp_ratio(diags: Sequence[Diagnostics], path: str) -> str:
  return _histograms(diags, [d.qq_qp_ratio for d in diags], path,
                     'cos(q_i, q_j) / cos(q_i, p_j)',
                     'Query-query vs query-document similarity, random i != j',
                     clip=(5, 95), mark=1.0)


def save_all(diags: Sequence[Diagnostics], out_dir: str) -> dict[str, str]:
  """Writes the three PNGs and stats.json into `out_dir`; returns their paths."""
  if not diags:
    raise ValueError('no diagnostics to plot')
  os.makedirs(out_dir, exist_ok=True)
  paths = {'tsne': plot_tsne(diags, os.path.join(out_dir, 'tsne.png')),
           'top1_cosine': plot_top1_cosine(diags, os.path.join(out_dir, 'top1_cosine.png')),
           'qq_qp_ratio': plot_qq_qp_ratio(diags, os.path.join(out_dir, 'qq_qp_ratio.png'))}
  paths['stats'] = os.path.join(out_dir, 'stats.json')
  with open(paths['stats'], 'w') as f:
    json.dump({d.label: d.stats for d in diags}, f, indent=2)
  return paths


def query_positive_pairs(query_ids: Sequence[str], corpus_ids: Sequence[str], qrels,
                         min_relevance: int = 1) -> tuple[list[int], list[int]]:
  """(query rows, corpus rows): each query that has a positive, with its first positive."""
  doc_row = {d: i for i, d in enumerate(corpus_ids)}
  q_rows, d_rows = [], []
  for i, qid in enumerate(query_ids):
    positives = [d for d, rel in qrels.get(qid, {}).items()
                 if rel >= min_relevance and d in doc_row]
    if positives:
      q_rows.append(i)
      d_rows.append(doc_row[positives[0]])
  if len(q_rows) < 2:
    raise sources.DataError(f'only {len(q_rows)} queries have a positive document in the '
                            'corpus; the diagnostics need at least 2')
  return q_rows, d_rows
