"""Output-length prediction: how many tokens will a request generate? Pure.

The gateway knows each running request's prompt and the tokens it has streamed so far; only the
rest of its output is unknown. One :class:`OutputPredictor` answers that question for everyone
who needs it, from the lengths of finished requests:

* admission (``kv_admission: predict``, :mod:`gateway.admission`) asks for :meth:`bound`, a
  high quantile (``quantile``, default 0.9) of the recent lengths: the output to plan KV memory
  for, so that few requests outgrow their plan;
* ``vtc-predict`` (and the busy-tenant credit of ``vtc``) asks for :meth:`mean`, the moving
  average of the last ``mean_window`` lengths (the VTC paper's predictor): the output to charge
  up front, refunded or topped up as the real length comes in.

History is kept per *key* ``(tenant, model, endpoint)``: one tenant's chat traffic on one model
tends to look like itself and not like another's batch summaries. A key with fewer than
``min_samples`` lengths borrows the history of its model and endpoint across tenants; with
none of either, :meth:`bound` returns ``prior`` and :meth:`mean` the cap (the paper's choice:
charge ``max_tokens``, refund later). Both answers are capped by the request's own bound
(``max_tokens``, or what its context leaves), so ``max_tokens`` is an upper limit on the
prediction, never the booking.

Cost: :meth:`observe` is O(1) (two bounded deques, a running sum); :meth:`bound` sorts the
key's window (``window`` lengths, 128 by default) at most once per new observation and is a
dictionary lookup otherwise; :meth:`mean` is O(1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: ``(tenant, model, endpoint)``: whose history a prediction reads.
Key = tuple[str, str, str]

#: Output tokens assumed for a request of a key and model never seen before (admission only).
DEFAULT_PRIOR = 1024


@dataclass(slots=True)
class _History:
    lengths: deque[int]  # the last `window` lengths
    recent: deque[int]  # the last `mean_window` lengths
    recent_sum: int = 0
    _bound: int | None = field(default=None, repr=False)  # cached quantile

    def add(self, n: int) -> None:
        self.lengths.append(n)
        recent = self.recent
        if len(recent) == recent.maxlen:
            self.recent_sum -= recent[0]
        recent.append(n)
        self.recent_sum += n
        self._bound = None


class OutputPredictor:
    """Per ``(tenant, model, endpoint)`` output-length history; see the module docstring."""

    def __init__(
        self,
        *,
        quantile: float = 0.9,
        window: int = 128,
        mean_window: int = 10,
        min_samples: int = 8,
        prior: int = DEFAULT_PRIOR,
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if window < 1 or mean_window < 1 or min_samples < 1 or prior < 1:
            raise ValueError("window, mean_window, min_samples and prior must be >= 1")
        self.quantile = quantile
        self.window = window
        self.mean_window = mean_window
        self.min_samples = min_samples
        self.prior = prior
        self._hist: dict[Key, _History] = {}
        self.observed = 0  # lengths seen over the predictor's life

    def _history(self, key: Key) -> _History:
        h = self._hist.get(key)
        if h is None:
            h = self._hist[key] = _History(
                deque(maxlen=self.window), deque(maxlen=self.mean_window)
            )
        return h

    def observe(self, key: Key, output_tokens: int) -> None:
        """A request of ``key`` finished after generating ``output_tokens``."""
        n = max(0, int(output_tokens))
        self._history(key).add(n)
        self._history(("", key[1], key[2])).add(n)  # the model's history across tenants
        self.observed += 1

    def _source(self, key: Key) -> _History | None:
        """The history to read: the key's own once it has ``min_samples``, else its model's
        (when that has them), else whatever the key has (possibly nothing)."""
        own = self._hist.get(key)
        if own is not None and len(own.lengths) >= self.min_samples:
            return own
        shared = self._hist.get(("", key[1], key[2]))
        if shared is not None and len(shared.lengths) >= self.min_samples:
            return shared
        return own if own is not None and own.lengths else None

    def bound(self, key: Key, cap: int) -> int:
        """Output tokens to plan KV memory for: the ``quantile`` of the recent lengths (the
        largest seen while there are fewer than ``min_samples``; ``prior`` with none), at
        most ``cap``."""
        h = self._source(key)
        if h is None:
            return min(cap, self.prior)
        b = h._bound
        if b is None:
            lengths = sorted(h.lengths)
            if len(lengths) < self.min_samples:
                b = max(lengths[-1], min(self.prior, 2 * lengths[-1]))
            else:
                b = lengths[min(len(lengths) - 1, int(self.quantile * len(lengths)))]
            h._bound = b
        return min(cap, b)

    def mean(self, key: Key, cap: int) -> int:
        """Output tokens to charge up front: the moving average of the key's last
        ``mean_window`` lengths, at most ``cap`` (``cap`` with no history of the key's own)."""
        h = self._hist.get(key)
        if h is None or not h.recent:
            return cap
        return min(cap, round(h.recent_sum / len(h.recent)))

    def keys(self) -> int:
        return len(self._hist)
