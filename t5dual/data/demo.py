"""A generated retrieval collection for the demo and the tests (no downloads).

Each document mentions a few "concepts", written with the concept's document
word; its queries name two of the same concepts, each with a different,
query-side word (an alias). Lexical matching therefore fails: BM25 and an
untrained dual encoder retrieve at chance, and a trained model must learn the
aliases. Test queries belong to documents that no training pair contains, so
the test measures whether the learnt aliases generalise.

With `lexical_overlap` p > 0, each concept a query names is written with the
document's own word with probability p instead: the vocabulary mismatch of
real queries, where BM25 finds some of the right words. The demo uses 0.5:
a query with both words literal is BM25's easy case, one with a single literal
word is shared with the ~30 documents that mention that concept (BM25 recalls
the answer but cannot rank it first; a model that knows the aliases can), one
with none is lost to BM25 and found only through the aliases.
"""

from __future__ import annotations

import json
import os

import numpy as np

_FILLERS = ('the', 'a', 'of', 'and', 'with', 'for', 'in', 'on', 'about', 'some', 'this',
            'that', 'is', 'are', 'very', 'often', 'new', 'old', 'small', 'large')
_QUESTION = ('what', 'which', 'how', 'where', 'find', 'show', 'tell me', 'looking for')
_CONSONANTS = 'bdfgklmnprstvz'
_VOWELS = 'aeiou'


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
  words: set[str] = set()
  while len(words) < count:
    n = rng.integers(2, 4)
    words.add(''.join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
                      for _ in range(n)))
  return sorted(words)


def write_demo_beir(folder: str, num_docs: int = 2000, num_concepts: int = 300,
                    concepts_per_doc: int = 3, test_fraction: float = 0.15,
                    seed: int = 0, lexical_overlap: float = 0.0) -> dict:
  """Writes corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv; returns counts.

  lexical_overlap: probability that a query names a concept with the
  document's word rather than its alias (0: never; the collection is then the
  same as before the option existed, for a given seed).
  """
  if not 0.0 <= lexical_overlap <= 1.0:
    raise ValueError(f'lexical_overlap must be in [0, 1], got {lexical_overlap}')
  rng = np.random.default_rng(seed)
  words = list(rng.permutation(_pseudo_words(rng, 2 * num_concepts)))
  doc_word, query_word = words[:num_concepts], words[num_concepts:]
  os.makedirs(os.path.join(folder, 'qrels'), exist_ok=True)
  num_test = int(num_docs * test_fraction)
  corpus, queries, qrels = [], [], {'train': [], 'test': []}
  for d in range(num_docs):
    concepts = rng.choice(num_concepts, concepts_per_doc, replace=False)
    tokens = [doc_word[c] for c in concepts] + list(
        rng.choice(_FILLERS, rng.integers(3, 8)))
    corpus.append({'_id': f'd{d}', 'title': '', 'text': ' '.join(rng.permutation(tokens))})
    split = 'test' if d < num_test else 'train'
    for k in range(2):
      named = rng.choice(concepts, 2, replace=False)
      # The draws for overlap happen only when it is on: seeds keep their collections.
      said = [doc_word[c] if lexical_overlap and rng.random() < lexical_overlap
              else query_word[c] for c in named]
      text = ' '.join([str(rng.choice(_QUESTION))] + said + list(rng.choice(_FILLERS, 2)))
      qid = f'q{d}_{k}'
      queries.append({'_id': qid, 'text': text})
      qrels[split].append((qid, f'd{d}'))
  with open(os.path.join(folder, 'corpus.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in corpus)
  with open(os.path.join(folder, 'queries.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in queries)
  for split, rows in qrels.items():
    with open(os.path.join(folder, 'qrels', f'{split}.tsv'), 'w') as f:
      f.write('query-id\tcorpus-id\tscore\n')
      f.writelines(f'{q}\t{d}\t1\n' for q, d in rows)
  return {'docs': len(corpus), 'queries': len(queries),
          'train_pairs': len(qrels['train']), 'test_pairs': len(qrels['test'])}


def demo_texts(folder: str) -> list[str]:
  """All texts of a demo folder, for training its SentencePiece vocabulary."""
  texts = []
  for name in ('corpus.jsonl', 'queries.jsonl'):
    with open(os.path.join(folder, name)) as f:
      texts += [json.loads(line)['text'] for line in f]
  return texts
