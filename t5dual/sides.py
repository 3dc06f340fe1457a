"""The two sides of a retrieval pair, named once.

A dual encoder has a query side and a document side. Older names survive in
file formats and in T5X conventions: the query side is the "left" tower and
the seqio feature 'inputs'; the document side is the "right" tower and the
feature 'targets'. Code takes a `Side` (or any of those names, through
`Side.parse`) and asks it for the name a format needs, instead of deriving
one name from another by hand.
"""

from __future__ import annotations

import enum


class Side(str, enum.Enum):
  QUERY = 'query'
  DOCUMENT = 'document'

  @property
  def tower(self) -> str:
    """'left' / 'right': the tower name of t5x_retrieval and ADE parameter trees."""
    return 'left' if self is Side.QUERY else 'right'

  @property
  def feature(self) -> str:
    """'inputs' / 'targets': the seqio feature (and TASK_FEATURE_LENGTHS key)."""
    return 'inputs' if self is Side.QUERY else 'targets'

  @property
  def beir_part(self) -> str:
    """'queries' / 'corpus': the BEIR file this side's texts come from."""
    return 'queries' if self is Side.QUERY else 'corpus'

  @classmethod
  def parse(cls, name: 'str | Side') -> 'Side':
    """Accepts a Side or any of its names: query/left/inputs/queries, document/doc/right/targets/corpus."""
    if isinstance(name, Side):
      return name
    key = str(name).lower()
    if key in _ALIASES:
      return _ALIASES[key]
    raise ValueError(f'unknown side {name!r}: use one of {sorted(_ALIASES)}')

  def __str__(self) -> str:
    return self.value


_ALIASES = {
    **{n: Side.QUERY for n in ('query', 'queries', 'left', 'inputs', 'q')},
    **{n: Side.DOCUMENT for n in ('document', 'doc', 'documents', 'corpus', 'right', 'targets',
                                  'd', 'passage')},
}
